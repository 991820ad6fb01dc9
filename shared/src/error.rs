//! The JSON error body: `{"error": {"code": "<machine_code>", "message": "<human text>"}}`.
//!
//! Every error the gateway produces itself, at the edge or at the origin, uses this shape
//! (PROTOCOL.md, "Conventions"), so clients need one parser for all of them.

use serde::{Deserialize, Serialize};

/// The inner object of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// A stable, machine-readable code (`snake_case`), e.g. `invalid_token`.
    pub code: String,
    /// A human-readable explanation; never contains a secret.
    pub message: String,
}

/// The whole error response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

impl ErrorBody {
    /// Builds a body from a code and a message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }

    /// The body as JSON text. Serialising two strings cannot fail.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an ErrorBody is two strings and always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_protocol_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&ErrorBody::new("bad_request", "no \"quotes\" lost").to_json())
                .unwrap();
        assert_eq!(v["error"]["code"], "bad_request");
        assert_eq!(v["error"]["message"], "no \"quotes\" lost");
        assert_eq!(v.as_object().unwrap().len(), 1);
    }
}
