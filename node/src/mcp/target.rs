//! Which servers a request (and its session) talks to: the endpoint it came to.

/// Which servers a session talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/mcp`: every server the token's tenant may use, names prefixed `server__`.
    Aggregate,
    /// `/servers/{name}/mcp`: one server, names unchanged.
    Server(String),
}

/// The endpoint a request came to: `/servers/{name}/mcp` names a server, `/mcp` does not.
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Target {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state).await;
        let name = params.ok().and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == "name")
                .map(|(_, v)| v.to_string())
        });
        Ok(match name {
            Some(n) => Target::Server(n),
            None => Target::Aggregate,
        })
    }
}
