//! Validation of what operators write, done once at the API edge so that the state machine only
//! ever sees well-formed specs. Every error names the field at fault.

use mcpcp_proto::api::{
    scope, CreateTokenRequest, IssuerSpec, LimitSpec, OAuthClient, PolicySpec, Role, SandboxSpec,
    ServerSpec, TenantSpec,
};

/// A rejected field: `field` is the JSON path of the value, `message` says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Longest server name. Tools are exposed as `{server}__{tool}` under a 64-character limit,
/// so a server name leaves room for the tool's own.
pub const MAX_SERVER_NAME: usize = 32;
pub const MAX_TENANT_NAME: usize = 63;
const MAX_POOL_SIZE: u32 = 256;

/// A name of a server or tenant: lowercase ASCII letters, digits, `-` and `_`, starting with a
/// letter or digit, without `__` (the separator of aggregated tool names).
pub fn name(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters, got {}", value.len()),
        ));
    }
    let first = value.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(FieldError::new(
            field,
            format!("{value:?} must start with a lowercase letter or a digit"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(FieldError::new(
            field,
            format!("{value:?} has {c:?}; allowed are a-z, 0-9, '-' and '_'"),
        ));
    }
    if value.contains("__") {
        return Err(FieldError::new(
            field,
            format!("{value:?} must not contain \"__\" (it separates server and tool names)"),
        ));
    }
    Ok(())
}

/// Headers the gateway sets on every request to a remote server; a spec may not set them.
const RESERVED_HEADERS: &[&str] = &[
    "accept",
    "connection",
    "content-length",
    "content-type",
    "host",
    "mcp-protocol-version",
    "mcp-session-id",
    "last-event-id",
    "transfer-encoding",
];

/// A remote server's endpoint: an absolute `http` or `https` URL with a host, and no user
/// name or password in it (credentials go in `headers`, which are sealed).
fn remote_url(url: &str) -> Result<(), FieldError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            FieldError::new(
                "url",
                format!("{url:?} must start with https:// or http://"),
            )
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.contains('@') {
        return Err(FieldError::new(
            "url",
            "must not carry a user name or password: give credentials as headers (sealed)",
        ));
    }
    if host.is_empty() || url.len() > 2048 || url.bytes().any(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(FieldError::new(
            "url",
            format!("{url:?} is not an absolute URL with a host (at most 2048 bytes, no spaces)"),
        ));
    }
    Ok(())
}

pub fn server_spec(spec: &ServerSpec) -> Result<(), FieldError> {
    name("name", &spec.name, MAX_SERVER_NAME)?;
    if let Some(sandbox) = &spec.sandbox {
        if spec.url.is_some() {
            return Err(FieldError::new(
                "sandbox",
                "only a local server (command) runs in a sandbox",
            ));
        }
        sandbox_spec(sandbox)?;
    }
    if let Some(t) = &spec.tenant {
        name("tenant", t, MAX_TENANT_NAME)?;
    }
    match &spec.url {
        None if spec.command.trim().is_empty() => {
            return Err(FieldError::new(
                "command",
                "must not be empty (or give url for a remote server)",
            ));
        }
        None => {}
        Some(_) if !spec.command.is_empty() => {
            return Err(FieldError::new(
                "url",
                "a server is either local (command) or remote (url), not both",
            ));
        }
        Some(url) => remote_url(url)?,
    }
    if spec.url.is_none() && !spec.headers.is_empty() {
        return Err(FieldError::new(
            "headers",
            "only a remote server (url) has headers",
        ));
    }
    for (k, v) in &spec.headers {
        let valid_name = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        if !valid_name {
            return Err(FieldError::new(
                format!("headers.{k}"),
                "a header name is letters, digits, '-' and '_'",
            ));
        }
        if RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(k)) {
            return Err(FieldError::new(
                format!("headers.{k}"),
                "is set by the gateway itself (the transport's own headers)",
            ));
        }
        if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(FieldError::new(
                format!("headers.{k}"),
                "must not contain control characters",
            ));
        }
    }
    if let Some(oauth) = &spec.oauth {
        if spec.url.is_none() {
            return Err(FieldError::new(
                "oauth",
                "only a remote server (url) has an OAuth client",
            ));
        }
        oauth_client(oauth, &spec.headers)?;
    }
    if spec.command.contains('\0') || spec.args.iter().any(|a| a.contains('\0')) {
        return Err(FieldError::new("args", "must not contain NUL bytes"));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(FieldError::new(
                format!("env.{k}"),
                "a variable name must be non-empty and have no '=' or NUL",
            ));
        }
        if v.contains('\0') {
            return Err(FieldError::new(format!("env.{k}"), "must not contain NUL"));
        }
    }
    if let Some(cwd) = &spec.cwd {
        if cwd.is_empty() {
            return Err(FieldError::new("cwd", "must not be empty when given"));
        }
    }
    if spec.pool_size == 0 || spec.pool_size > MAX_POOL_SIZE {
        return Err(FieldError::new(
            "pool_size",
            format!(
                "must be between 1 and {MAX_POOL_SIZE}, got {}",
                spec.pool_size
            ),
        ));
    }
    if spec.replicas == Some(0) {
        return Err(FieldError::new(
            "replicas",
            "must be at least 1 (omit it to run on every node)",
        ));
    }
    for (i, f) in spec.fallbacks.iter().enumerate() {
        name(&format!("fallbacks[{i}]"), f, MAX_SERVER_NAME)?;
        if *f == spec.name {
            return Err(FieldError::new(
                format!("fallbacks[{i}]"),
                "a server cannot be its own fallback",
            ));
        }
    }
    let t = &spec.timeouts;
    for (field, v) in [
        ("timeouts.request_ms", t.request_ms),
        ("timeouts.startup_ms", t.startup_ms),
        ("timeouts.idle_ms", t.idle_ms),
    ] {
        if v == 0 {
            return Err(FieldError::new(field, "must be greater than 0"));
        }
    }
    for (i, tool) in spec.idempotent_tools.iter().enumerate() {
        if tool.is_empty() || tool.len() > 128 {
            return Err(FieldError::new(
                format!("idempotent_tools[{i}]"),
                "must be 1 to 128 characters",
            ));
        }
    }
    Ok(())
}

/// A remote server's OAuth client: a secure token endpoint, a client id and secret, scopes as
/// RFC 6749 spells them, an absolute resource URI without a fragment (RFC 8707), and no static
/// `Authorization` header beside it.
fn oauth_client(
    oauth: &OAuthClient,
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<(), FieldError> {
    secure_url("oauth.token_url", &oauth.token_url)?;
    let printable =
        |v: &str| !v.is_empty() && v.len() <= 1024 && v.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !printable(&oauth.client_id) {
        return Err(FieldError::new(
            "oauth.client_id",
            "must be 1 to 1024 printable ASCII characters",
        ));
    }
    if !printable(&oauth.client_secret) && !oauth.client_secret.starts_with(crate::seal::SEALED) {
        return Err(FieldError::new(
            "oauth.client_secret",
            "must be 1 to 1024 printable ASCII characters",
        ));
    }
    for (i, scope) in oauth.scopes.iter().enumerate() {
        // scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
        let token = !scope.is_empty()
            && scope.len() <= 256
            && scope
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        if !token {
            return Err(FieldError::new(
                format!("oauth.scopes[{i}]"),
                "a scope is 1 to 256 printable characters without spaces, '\"' or '\\'",
            ));
        }
    }
    if let Some(resource) = &oauth.resource {
        let ok = reqwest::Url::parse(resource)
            .is_ok_and(|u| matches!(u.scheme(), "https" | "http") && u.fragment().is_none());
        if !ok {
            return Err(FieldError::new(
                "oauth.resource",
                "must be an absolute http(s) URI without a fragment (RFC 8707)",
            ));
        }
    }
    if oauth.ca_file.as_deref().is_some_and(str::is_empty) {
        return Err(FieldError::new(
            "oauth.ca_file",
            "must not be empty when given",
        ));
    }
    if headers
        .keys()
        .any(|k| k.eq_ignore_ascii_case("authorization"))
    {
        return Err(FieldError::new(
            "oauth",
            "sets the Authorization header itself: remove headers.Authorization (or --bearer-env)",
        ));
    }
    Ok(())
}

/// A sandbox's user and limits: well formed and within sane bounds (the node checks that it
/// can honour them when it starts the process).
fn sandbox_spec(s: &SandboxSpec) -> Result<(), FieldError> {
    if let Some(run_as) = &s.run_as {
        let part = |p: &str| {
            !p.is_empty()
                && p.len() <= 32
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        let valid = match run_as.split_once(':') {
            Some((user, group)) => part(user) && part(group),
            None => part(run_as),
        };
        if !valid {
            return Err(FieldError::new(
                "sandbox.run_as",
                "must be USER or USER:GROUP (names or numbers, at most 32 characters each)",
            ));
        }
    }
    for (field, value, range) in [
        ("sandbox.memory_mb", s.memory_mb, 16..=1_048_576),
        ("sandbox.cpu_seconds", s.cpu_seconds, 1..=31_536_000),
        ("sandbox.open_files", s.open_files, 16..=1_048_576),
        ("sandbox.processes", s.processes, 1..=1_000_000),
    ] {
        if value.is_some_and(|v| !range.contains(&v)) {
            return Err(FieldError::new(
                field,
                format!("must be {} to {}", range.start(), range.end()),
            ));
        }
    }
    if s.processes.is_some() && s.run_as.is_none() {
        return Err(FieldError::new(
            "sandbox.processes",
            "needs run_as: the kernel counts processes per user, and does not limit root",
        ));
    }
    for (field, paths) in [
        ("sandbox.writable_paths", &s.writable_paths),
        ("sandbox.hidden_paths", &s.hidden_paths),
    ] {
        if paths.len() > MAX_SANDBOX_PATHS {
            return Err(FieldError::new(
                field,
                format!("at most {MAX_SANDBOX_PATHS} paths"),
            ));
        }
        if let Some(bad) = paths.iter().find(|p| !sandbox_path(p)) {
            return Err(FieldError::new(
                field,
                format!("{bad:?}: must be an absolute path other than /, without . or .. parts, at most 1024 bytes"),
            ));
        }
    }
    if let Some(inside) = s
        .writable_paths
        .iter()
        .find(|p| s.private_tmp && within(p, "/tmp"))
    {
        return Err(FieldError::new(
            "sandbox.writable_paths",
            format!("{inside:?} is inside the private /tmp, which starts empty"),
        ));
    }
    if s.isolated() && s.run_as.is_none() {
        return Err(FieldError::new(
            "sandbox.run_as",
            "private_network, read_only, private_tmp and hidden_paths need run_as (a user of the server's own): as root or mcpd's user, the process could undo them",
        ));
    }
    if let Some((hidden, writable)) = s.hidden_paths.iter().find_map(|h| {
        s.writable_paths
            .iter()
            .find(|w| within(h, w))
            .map(|w| (h, w))
    }) {
        return Err(FieldError::new(
            "sandbox.hidden_paths",
            format!("{hidden:?} is inside the writable path {writable:?}, where the server could move it away"),
        ));
    }
    if !s.writable_paths.is_empty() && !s.read_only {
        return Err(FieldError::new(
            "sandbox.writable_paths",
            "needs read_only: without it every path is as writable as the user makes it",
        ));
    }
    Ok(())
}

/// Paths a sandbox makes writable or hides, each.
const MAX_SANDBOX_PATHS: usize = 32;

/// Whether `path` is `dir` or below it (both normal, as `sandbox_path` checks).
fn within(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// An absolute, normal path other than `/`: what a mount may be put on.
fn sandbox_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && p.len() <= 1024
        && !p.contains('\0')
        && p[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// A limit: what it matches is well formed, and it limits something.
pub fn limit_spec(spec: &LimitSpec) -> Result<(), FieldError> {
    name("name", &spec.name, MAX_SERVER_NAME)?;
    if let Some(t) = &spec.tenant {
        name("tenant", t, MAX_TENANT_NAME)?;
    }
    if let Some(s) = &spec.server {
        name("server", s, MAX_SERVER_NAME)?;
    }
    for (field, value) in [("subject", &spec.subject), ("tool", &spec.tool)] {
        if value
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.len() > 256)
        {
            return Err(FieldError::new(field, "must be 1 to 256 characters"));
        }
    }
    if spec.tool.is_some() && spec.server.is_none() {
        return Err(FieldError::new(
            "tool",
            "needs server: tool names are per server",
        ));
    }
    if spec.rate.is_none() && spec.quota.is_none() && spec.concurrency.is_none() {
        return Err(FieldError::new(
            "rate",
            "give rate, quota, concurrency or more than one",
        ));
    }
    if spec
        .concurrency
        .is_some_and(|c| !(1..=1_000_000).contains(&c))
    {
        return Err(FieldError::new("concurrency", "must be 1 to 1000000"));
    }
    if let Some(r) = &spec.rate {
        if !(1..=1_000_000).contains(&r.per_second) {
            return Err(FieldError::new("rate.per_second", "must be 1 to 1000000"));
        }
        if !(1..=1_000_000).contains(&r.burst) {
            return Err(FieldError::new("rate.burst", "must be 1 to 1000000"));
        }
    }
    if let Some(q) = &spec.quota {
        if !(1..=1_000_000_000_000).contains(&q.calls) {
            return Err(FieldError::new("quota.calls", "must be 1 to 10^12"));
        }
    }
    Ok(())
}

pub fn tenant_spec(spec: &TenantSpec) -> Result<(), FieldError> {
    name("name", &spec.name, MAX_TENANT_NAME)?;
    if let Some(d) = &spec.description {
        if d.len() > 1024 {
            return Err(FieldError::new(
                "description",
                "must be at most 1024 characters",
            ));
        }
    }
    if !(1..=TenantSpec::MAX_WEIGHT).contains(&spec.weight) {
        return Err(FieldError::new(
            "weight",
            format!("must be 1 to {}", TenantSpec::MAX_WEIGHT),
        ));
    }
    Ok(())
}

/// Signature algorithms an issuer may be trusted with: asymmetric only (an HMAC key would be
/// a secret shared with every node), never `none`.
pub const JWT_ALGORITHMS: [&str; 8] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
];

/// An `https` URL, or `http` to a loopback host (a local provider in tests and dev).
fn secure_url(field: &str, value: &str) -> Result<(), FieldError> {
    let url = reqwest::Url::parse(value)
        .map_err(|e| FieldError::new(field, format!("not a URL: {e}")))?;
    let host = url.host_str().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(FieldError::new(
            field,
            "must be an https URL (http only to a loopback host)",
        )),
    }
}

/// Checks a trusted issuer.
pub fn issuer_spec(spec: &IssuerSpec) -> Result<(), FieldError> {
    name("name", &spec.name, MAX_TENANT_NAME)?;
    secure_url("issuer", &spec.issuer)?;
    if let Some(u) = &spec.jwks_url {
        secure_url("jwks_url", u)?;
    }
    if spec.algorithms.is_empty() {
        return Err(FieldError::new("algorithms", "name at least one"));
    }
    if let Some(bad) = spec
        .algorithms
        .iter()
        .find(|a| !JWT_ALGORITHMS.contains(&a.as_str()))
    {
        return Err(FieldError::new(
            "algorithms",
            format!("{bad:?} is not accepted; use some of {JWT_ALGORITHMS:?}"),
        ));
    }
    if let Some(id) = &spec.console_client_id {
        if id.is_empty()
            || id.len() > 256
            || id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                "console_client_id",
                "must be 1 to 256 characters without spaces",
            ));
        }
    }
    if spec.clock_skew_s > 600 {
        return Err(FieldError::new("clock_skew_s", "must be at most 600"));
    }
    if let Some(t) = &spec.tenant {
        name("tenant", t, MAX_TENANT_NAME)?;
    }
    for (field, claim) in [
        ("tenant_claim", &spec.tenant_claim),
        ("roles_claim", &spec.roles_claim),
        ("groups_claim", &spec.groups_claim),
    ] {
        if claim.is_empty() || claim.len() > 128 {
            return Err(FieldError::new(field, "must be 1 to 128 characters"));
        }
    }
    if spec.tenant.is_some() && !spec.default_role.is_tenant_scoped() {
        return Err(FieldError::new(
            "default_role",
            "a tenant's issuer makes user or tenant-admin callers only",
        ));
    }
    if spec.default_role == Role::Metrics {
        return Err(FieldError::new(
            "default_role",
            "a JWT caller cannot be a metrics reader; use an API token",
        ));
    }
    for a in &spec.audiences {
        if a.is_empty() || a.len() > 512 {
            return Err(FieldError::new(
                "audiences",
                "each must be 1 to 512 characters",
            ));
        }
    }
    Ok(())
}

/// Checks a policy rule's shape (its condition is compiled at the edge, `crate::policy`).
pub fn policy_spec(spec: &PolicySpec) -> Result<(), FieldError> {
    name("name", &spec.name, MAX_TENANT_NAME)?;
    const KINDS: [&str; 4] = ["server:", "tool:", "prompt:", "resource:"];
    for t in &spec.targets {
        if !KINDS.iter().any(|k| t.starts_with(k)) || t.len() > 1024 {
            return Err(FieldError::new(
                "targets",
                format!("{t:?} must start with one of {KINDS:?} (a glob may follow)"),
            ));
        }
    }
    for (field, list) in [
        ("tenants", &spec.tenants),
        ("subjects", &spec.subjects),
        ("groups", &spec.groups),
    ] {
        if list.len() > 256 || list.iter().any(|v| v.is_empty() || v.len() > 256) {
            return Err(FieldError::new(
                field,
                "at most 256 values of 1 to 256 characters",
            ));
        }
    }
    if spec.targets.len() > 256 {
        return Err(FieldError::new("targets", "at most 256"));
    }
    if spec
        .condition
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(FieldError::new("condition", "is empty; omit it instead"));
    }
    Ok(())
}

/// Checks a token request and resolves its role.
pub fn token_request(req: &CreateTokenRequest) -> Result<Role, FieldError> {
    if req.name.trim().is_empty() || req.name.len() > 128 {
        return Err(FieldError::new("name", "must be 1 to 128 characters"));
    }
    if req.ttl_seconds == Some(0) {
        return Err(FieldError::new(
            "ttl_seconds",
            "must be greater than 0 (omit it for a token that never expires)",
        ));
    }
    if let Some(scopes) = &req.scopes {
        if scopes.is_empty() {
            return Err(FieldError::new(
                "scopes",
                "name at least one (omit it for every scope of the role)",
            ));
        }
        if let Some(bad) = scopes.iter().find(|s| !scope::ALL.contains(&s.as_str())) {
            return Err(FieldError::new(
                "scopes",
                format!("{bad:?} is not a scope; use some of {:?}", scope::ALL),
            ));
        }
    }
    let role = match (req.role, &req.tenant) {
        (Some(role), Some(t)) if role.is_tenant_scoped() => {
            name("tenant", t, MAX_TENANT_NAME)?;
            role
        }
        (None, Some(t)) => {
            name("tenant", t, MAX_TENANT_NAME)?;
            Role::User
        }
        (Some(role), Some(_)) => {
            return Err(FieldError::new(
                "tenant",
                format!("a {role} token belongs to no tenant; omit tenant, or use role \"user\" or \"tenant-admin\""),
            ))
        }
        (Some(role), None) if role.is_tenant_scoped() => {
            return Err(FieldError::new(
                "tenant",
                format!("is required for a {role} token"),
            ))
        }
        (Some(role), None) => role,
        (None, None) => {
            return Err(FieldError::new(
                "tenant",
                "is required for a user token (or set a role such as \"cluster-admin\")",
            ))
        }
    };
    Ok(role)
}

/// Tools one server's pins hold at most, and their approved definitions' size.
pub const MAX_PINNED_TOOLS: usize = 1000;
pub const MAX_PINS_BYTES: usize = 1 << 20;

/// Checks a server's tool pins: names that are the tools' own, within the bounds.
pub fn tool_pins(pins: &mcpcp_proto::api::ToolPins) -> Result<(), FieldError> {
    if pins.tools.len() > MAX_PINNED_TOOLS {
        return Err(FieldError::new(
            "tools",
            format!("at most {MAX_PINNED_TOOLS} tools"),
        ));
    }
    for (name, tool) in &pins.tools {
        if name.is_empty() || tool.get("name").and_then(|n| n.as_str()) != Some(name.as_str()) {
            return Err(FieldError::new(
                "tools",
                format!("{name:?} must map to the tool's definition, whose \"name\" is {name:?}"),
            ));
        }
    }
    let size = serde_json::to_vec(&pins.tools)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_PINS_BYTES {
        return Err(FieldError::new(
            "tools",
            format!("the definitions take {size} bytes; at most {MAX_PINS_BYTES}"),
        ));
    }
    Ok(())
}

/// Tools one virtual server holds at most.
pub const MAX_VIRTUAL_TOOLS: usize = 500;

/// Checks a virtual server: its name, its tenant's, and tools each shown under one name.
pub fn virtual_server_spec(spec: &mcpcp_proto::api::VirtualServerSpec) -> Result<(), FieldError> {
    name("name", &spec.name, MAX_TENANT_NAME)?;
    if let Some(t) = &spec.tenant {
        name("tenant", t, MAX_TENANT_NAME)?;
    }
    if spec.tools.is_empty() || spec.tools.len() > MAX_VIRTUAL_TOOLS {
        return Err(FieldError::new(
            "tools",
            format!("name 1 to {MAX_VIRTUAL_TOOLS} tools"),
        ));
    }
    let mut shown = std::collections::BTreeSet::new();
    for (i, t) in spec.tools.iter().enumerate() {
        name(&format!("tools[{i}].server"), &t.server, MAX_TENANT_NAME)?;
        let exposed = t.exposed();
        for (field, v) in [("tool", t.tool.as_str()), ("name", exposed)] {
            if v.is_empty()
                || v.len() > 128
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                return Err(FieldError::new(
                    format!("tools[{i}].{field}"),
                    format!("{v:?} must be 1 to 128 letters, digits, '_', '-' or '.'"),
                ));
            }
        }
        if !shown.insert(exposed) {
            return Err(FieldError::new(
                format!("tools[{i}].name"),
                format!("{exposed:?} is shown twice; rename one (SERVER/TOOL=NAME)"),
            ));
        }
    }
    Ok(())
}

/// Checks an approved command: a name, a program, bounded arguments and variable names.
pub fn approved_command(spec: &mcpcp_proto::api::ApprovedCommand) -> Result<(), FieldError> {
    name("name", &spec.name, MAX_TENANT_NAME)?;
    if spec.command.trim().is_empty() || spec.command.len() > 4096 {
        return Err(FieldError::new("command", "must be 1 to 4096 characters"));
    }
    if spec.args.len() > 256 || spec.args.iter().any(|a| a.len() > 4096) {
        return Err(FieldError::new(
            "args",
            "at most 256 arguments of 4096 characters",
        ));
    }
    for (i, v) in spec.env.iter().enumerate() {
        if v.is_empty() || v.len() > 256 || v.contains('=') || v.contains('\0') {
            return Err(FieldError::new(
                format!("env[{i}]"),
                format!("{v:?} is not a variable name"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_within_a_directory_only_below_a_separator() {
        assert!(within("/tmp", "/tmp") && within("/tmp/out", "/tmp"));
        assert!(!within("/tmpfs/out", "/tmp") && !within("/srv", "/srv/out"));
    }

    fn spec(name: &str) -> ServerSpec {
        serde_json::from_value(serde_json::json!({"name": name, "command": "true"}))
            .expect("a minimal spec parses")
    }

    #[test]
    fn names_follow_the_rules() {
        assert!(name("name", "time", 32).is_ok());
        assert!(name("name", "git-2_a", 32).is_ok());
        assert_eq!(name("name", "", 32).unwrap_err().field, "name");
        assert!(name("name", "Time", 32).is_err());
        assert!(name("name", "-x", 32).is_err());
        assert!(name("name", "a__b", 32).is_err());
        assert!(name("name", "a b", 32).is_err());
        assert!(name("name", &"a".repeat(33), 32).is_err());
    }

    #[test]
    fn server_spec_errors_name_the_field() {
        let mut s = spec("demo");
        assert!(server_spec(&s).is_ok());
        s.pool_size = 0;
        assert_eq!(server_spec(&s).unwrap_err().field, "pool_size");
        let mut s = spec("demo");
        s.fallbacks = vec!["demo".into()];
        assert_eq!(server_spec(&s).unwrap_err().field, "fallbacks[0]");
        let mut s = spec("demo");
        s.env.insert("A=B".into(), "x".into());
        assert_eq!(server_spec(&s).unwrap_err().field, "env.A=B");
        let mut s = spec("demo");
        s.timeouts.request_ms = 0;
        assert_eq!(server_spec(&s).unwrap_err().field, "timeouts.request_ms");
        let mut s = spec("demo");
        s.command = " ".into();
        assert_eq!(server_spec(&s).unwrap_err().field, "command");
    }

    #[test]
    fn a_remote_server_has_a_url_and_no_command_and_only_its_own_headers() {
        let remote = |url: &str| {
            let mut s = spec("weather");
            s.command.clear();
            s.url = Some(url.into());
            s
        };
        let mut s = remote("https://weather.example.com/mcp");
        s.headers.insert("X-Api-Key".into(), "k".into());
        assert!(server_spec(&s).is_ok());
        let field = |s: &ServerSpec| server_spec(s).unwrap_err().field;
        assert_eq!(field(&remote("ftp://x/mcp")), "url");
        assert_eq!(field(&remote("https:///mcp")), "url");
        assert_eq!(field(&remote("https://user:pw@host/mcp")), "url");
        let mut both = remote("https://host/mcp");
        both.command = "uvx".into();
        assert_eq!(field(&both), "url");
        for reserved in ["Mcp-Session-Id", "content-type", "Host"] {
            let mut s = remote("https://host/mcp");
            s.headers.insert(reserved.into(), "x".into());
            assert_eq!(field(&s), format!("headers.{reserved}"));
        }
        let mut local = spec("demo");
        local.headers.insert("X-Api-Key".into(), "k".into());
        assert_eq!(field(&local), "headers");
    }

    #[test]
    fn an_oauth_client_is_a_remote_servers_with_a_secure_token_endpoint_and_rfc_6749_scopes() {
        let with = |f: &dyn Fn(&mut OAuthClient)| {
            let mut s = spec("mail");
            s.command.clear();
            s.url = Some("https://mail.example.com/mcp".into());
            let mut o = OAuthClient {
                token_url: "https://login.example.com/token".into(),
                client_id: "gateway".into(),
                client_secret: "s3cret".into(),
                scopes: vec!["mail.send".into()],
                resource: None,
                ca_file: None,
            };
            f(&mut o);
            s.oauth = Some(Box::new(o));
            s
        };
        assert_eq!(server_spec(&with(&|_| {})), Ok(()));
        assert_eq!(
            server_spec(&with(&|o| o.token_url = "http://127.0.0.1:9/token".into())),
            Ok(()),
            "http to a loopback provider"
        );
        let field = |s: &ServerSpec| server_spec(s).unwrap_err().field;
        assert_eq!(
            field(&with(
                &|o| o.token_url = "http://login.example.com/token".into()
            )),
            "oauth.token_url"
        );
        assert_eq!(field(&with(&|o| o.client_id.clear())), "oauth.client_id");
        assert_eq!(
            field(&with(&|o| o.client_secret.clear())),
            "oauth.client_secret"
        );
        assert_eq!(
            field(&with(&|o| o.scopes = vec!["a b".into()])),
            "oauth.scopes[0]"
        );
        assert_eq!(
            field(&with(
                &|o| o.resource = Some("https://mail.example.com/mcp#x".into())
            )),
            "oauth.resource"
        );
        let mut both = with(&|_| {});
        both.headers
            .insert("authorization".into(), "Bearer x".into());
        assert_eq!(field(&both), "oauth");
        let mut local = with(&|_| {});
        local.url = None;
        local.command = "uvx".into();
        assert_eq!(field(&local), "oauth");
    }

    #[test]
    fn token_roles_resolve() {
        let req = |role: Option<Role>, tenant: Option<&str>| CreateTokenRequest {
            name: "t".into(),
            role,
            tenant: tenant.map(String::from),
            ttl_seconds: None,
            scopes: None,
        };
        assert_eq!(token_request(&req(None, Some("acme"))), Ok(Role::User));
        assert_eq!(
            token_request(&req(Some(Role::ClusterAdmin), None)),
            Ok(Role::ClusterAdmin)
        );
        assert_eq!(
            token_request(&req(Some(Role::ClusterAdmin), Some("acme")))
                .unwrap_err()
                .field,
            "tenant"
        );
        assert_eq!(token_request(&req(None, None)).unwrap_err().field, "tenant");
        let scoped = |scopes: &[&str]| CreateTokenRequest {
            scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
            ..req(Some(Role::Viewer), None)
        };
        assert_eq!(token_request(&scoped(&["admin:read"])), Ok(Role::Viewer));
        assert_eq!(token_request(&scoped(&[])).unwrap_err().field, "scopes");
        assert_eq!(
            token_request(&scoped(&["root"])).unwrap_err().field,
            "scopes"
        );
        assert_eq!(
            token_request(&req(Some(Role::TenantAdmin), Some("acme"))),
            Ok(Role::TenantAdmin)
        );
        for unscoped in [Role::Operator, Role::Viewer, Role::Metrics] {
            assert_eq!(token_request(&req(Some(unscoped), None)), Ok(unscoped));
            assert_eq!(
                token_request(&req(Some(unscoped), Some("acme")))
                    .unwrap_err()
                    .field,
                "tenant"
            );
        }
        assert_eq!(
            token_request(&req(Some(Role::TenantAdmin), None))
                .unwrap_err()
                .field,
            "tenant"
        );
    }

    #[test]
    fn issuer_specs_are_checked_field_by_field() {
        let good = || IssuerSpec {
            name: "okta".into(),
            issuer: "https://id.example.com".into(),
            audiences: vec![],
            jwks_url: None,
            algorithms: vec!["RS256".into()],
            clock_skew_s: 60,
            tenant: None,
            tenant_claim: "tenant".into(),
            roles_claim: "roles".into(),
            default_role: Role::User,
            groups_claim: "groups".into(),
            accept_untyped: false,
            console_client_id: None,
            ca_file: None,
        };
        assert_eq!(issuer_spec(&good()), Ok(()));
        let field = |f: &dyn Fn(&mut IssuerSpec)| {
            let mut s = good();
            f(&mut s);
            issuer_spec(&s).unwrap_err().field
        };
        assert_eq!(
            field(&|s| s.issuer = "http://id.example.com".into()),
            "issuer"
        );
        assert_eq!(field(&|s| s.issuer = "not a url".into()), "issuer");
        assert_eq!(field(&|s| s.algorithms = vec!["none".into()]), "algorithms");
        assert_eq!(
            field(&|s| s.algorithms = vec!["HS256".into()]),
            "algorithms"
        );
        assert_eq!(field(&|s| s.algorithms.clear()), "algorithms");
        assert_eq!(field(&|s| s.clock_skew_s = 3600), "clock_skew_s");
        assert_eq!(field(&|s| s.jwks_url = Some("ftp://x".into())), "jwks_url");
        assert_eq!(field(&|s| s.default_role = Role::Metrics), "default_role");
        assert_eq!(field(&|s| s.tenant_claim = String::new()), "tenant_claim");
        assert_eq!(
            field(&|s| {
                s.tenant = Some("acme".into());
                s.default_role = Role::Viewer;
            }),
            "default_role"
        );
        let mut loopback = good();
        loopback.issuer = "http://127.0.0.1:9000".into();
        assert_eq!(issuer_spec(&loopback), Ok(()));
    }
}
