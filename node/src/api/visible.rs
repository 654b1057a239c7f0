//! Registry objects as a caller may see them: a list answer of the visible ones, or one by
//! name, answered `404` alike whether it is absent or another tenant's.

use std::collections::BTreeMap;

use mcpcp_proto::api::{List, Versioned};

use super::error::ApiError;

/// The objects of `map` that `sees` lets through, at registry revision `revision`.
pub fn listed<T: Clone>(
    revision: u64,
    map: &BTreeMap<String, Versioned<T>>,
    sees: impl Fn(&T) -> bool,
) -> List<Versioned<T>> {
    List {
        revision,
        items: map.values().filter(|v| sees(&v.spec)).cloned().collect(),
    }
}

/// Object `name` of `map` (a `noun`), if `sees` lets it through.
pub fn found<T: Clone>(
    map: &BTreeMap<String, Versioned<T>>,
    name: &str,
    noun: &str,
    sees: impl Fn(&T) -> bool,
) -> Result<Versioned<T>, ApiError> {
    map.get(name)
        .filter(|v| sees(&v.spec))
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("{noun} {name:?} not found")))
}
