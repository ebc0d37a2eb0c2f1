//! The one pagination helper: `after`/`limit`/`order` in, `{object: "list", ...}` out.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::ApiError;
use crate::store::files::{Order, PageRequest};

/// Raw query parameters of a list route, parsed by [`ListParams::page`].
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    pub after: Option<String>,
    pub limit: Option<String>,
    pub order: Option<String>,
}

impl ListParams {
    /// Validates the parameters against a route's default and maximum page size.
    pub fn page(
        &self,
        default_limit: i64,
        max_limit: i64,
        default_order: Order,
    ) -> Result<PageRequest, ApiError> {
        let limit = match self.limit.as_deref() {
            None | Some("") => default_limit,
            Some(raw) => match raw.parse::<i64>() {
                Ok(n) if (1..=max_limit).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_request(
                        format!("limit must be an integer between 1 and {max_limit}, got '{raw}'"),
                        "limit",
                    ));
                }
            },
        };
        let order = match self.order.as_deref() {
            None | Some("") => default_order,
            Some("asc") => Order::Asc,
            Some("desc") => Order::Desc,
            Some(other) => {
                return Err(ApiError::bad_request(
                    format!("order must be 'asc' or 'desc', got '{other}'"),
                    "order",
                ));
            }
        };
        let after = self.after.clone().filter(|a| !a.is_empty());
        Ok(PageRequest {
            after,
            limit,
            order,
        })
    }
}

/// An OpenAI list body. `first_id`/`last_id` are included where the OpenAI route has them.
pub fn list_body<T: Serialize>(
    data: Vec<T>,
    has_more: bool,
    ids: Option<(Option<String>, Option<String>)>,
) -> Value {
    let mut body = json!({"object": "list", "data": data, "has_more": has_more});
    if let Some((first_id, last_id)) = ids {
        body["first_id"] = json!(first_id);
        body["last_id"] = json!(last_id);
    }
    body
}
