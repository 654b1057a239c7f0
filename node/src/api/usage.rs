//! `GET /v1/usage`: the replicated hourly usage aggregates (`crate::usage`), summed per tenant,
//! subject, server and tool over the hours asked for, for billing exports and
//! `mcpctl usage`. A tenant admin sees its own tenant's only.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use mcpcp_proto::api::{List, UsageRow};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{ApiQuery, Authorized};
use super::AppState;
use crate::identity::surface::ObjectRead;
use crate::registry::validate::FieldError;

/// Longest span one request may sum (the retention's upper bound).
const MAX_SINCE_S: u64 = 8784 * 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// How far back: `90m`, `24h`, `7d`, or seconds (default `24h`).
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    subject: Option<String>,
}

/// `90m`, `24h`, `7d` or plain seconds.
fn seconds(span: &str) -> Option<u64> {
    let (n, unit) = match span.char_indices().last()? {
        (i, 'm') => (&span[..i], 60),
        (i, 'h') => (&span[..i], 3600),
        (i, 'd') => (&span[..i], 86_400),
        _ => (span, 1),
    };
    n.parse::<u64>().ok()?.checked_mul(unit)
}

pub async fn get(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<List<UsageRow>>, ApiError> {
    let since = match &q.since {
        None => 24 * 3600,
        Some(s) => seconds(s).filter(|s| *s <= MAX_SINCE_S).ok_or_else(|| {
            FieldError::new(
                "since",
                "must be like 90m, 24h, 7d or seconds, at most 366 days",
            )
        })?,
    };
    // A tenant-scoped caller is held to its own tenant, whatever it asks.
    let tenant = if caller.role.is_tenant_scoped() {
        Some(caller.tenant.clone().unwrap_or_default())
    } else {
        q.tenant.clone()
    };
    let from = crate::registry::now_unix().saturating_sub(since) / 3600 * 3600;
    let data = state.registry.local();
    let mut sums: BTreeMap<(String, String, String, String), UsageRow> = BTreeMap::new();
    let wanted = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
    for row in data.state.usage.values().filter(|r| r.hour >= from) {
        if !(wanted(&tenant, &row.tenant)
            && wanted(&q.server, &row.server)
            && wanted(&q.subject, &row.subject))
        {
            continue;
        }
        let key = (
            row.tenant.clone(),
            row.subject.clone(),
            row.server.clone(),
            row.tool.clone(),
        );
        sums.entry(key)
            .and_modify(|s| {
                s.add(row);
                s.hour = s.hour.min(row.hour);
            })
            .or_insert_with(|| row.clone());
    }
    Ok(Json(List {
        revision: data.state.revision,
        items: sums.into_values().collect(),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn spans_read_in_minutes_hours_days_or_seconds() {
        assert_eq!(super::seconds("90m"), Some(5400));
        assert_eq!(super::seconds("24h"), Some(86_400));
        assert_eq!(super::seconds("7d"), Some(604_800));
        assert_eq!(super::seconds("120"), Some(120));
        assert_eq!(super::seconds("h"), None);
        assert_eq!(super::seconds("-1h"), None);
    }
}
