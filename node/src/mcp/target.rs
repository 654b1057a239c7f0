//! Which servers a request (and its session) talks to: the endpoint it came to.

/// Which servers a session talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/mcp`: every server the token's tenant may use, names prefixed `server__`.
    Aggregate,
    /// `/servers/{name}/mcp`: one server, names unchanged.
    Server(String),
    /// `/v/{vname}/mcp`: a virtual server's curated, renamed tools of several servers.
    Virtual(String),
}

impl Target {
    /// How a session id names its endpoint (`v:NAME` for a virtual server: server names
    /// hold no colon).
    pub fn claim(&self) -> Option<String> {
        match self {
            Target::Aggregate => None,
            Target::Server(n) => Some(n.clone()),
            Target::Virtual(n) => Some(format!("v:{n}")),
        }
    }
}

/// The endpoint a request came to: `/servers/{name}/mcp` names a server, `/v/{vname}/mcp` a
/// virtual server, `/mcp` neither.
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Target {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state).await;
        let named = params.ok().and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == "name" || *k == "vname")
                .map(|(k, v)| (k == "vname", v.to_string()))
        });
        Ok(match named {
            Some((false, n)) => Target::Server(n),
            Some((true, n)) => Target::Virtual(n),
            None => Target::Aggregate,
        })
    }
}
