//! Validated identifiers: bad input is rejected at the edge with the field that is wrong.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

macro_rules! id_type {
    ($name:ident, $what:literal, $max:literal, $allowed:expr) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, FieldError> {
                let allowed: fn(char) -> bool = $allowed;
                if value.is_empty() || value.len() > $max {
                    return Err(FieldError::new($what, format!("must be 1 to {} characters", $max)));
                }
                if !value.chars().all(allowed) {
                    return Err(FieldError::new($what, format!("{value:?} has characters outside the allowed set")));
                }
                Ok(Self(value.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = FieldError;
            fn try_from(value: String) -> Result<Self, FieldError> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

// Ids end up in stream ids (`Order-<id>`) and execution names (80 chars, no spaces).
id_type!(OrderId, "orderId", 64, |c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
id_type!(CustomerId, "customerId", 64, |c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
id_type!(Sku, "sku", 32, |c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-');

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(OrderId::parse("ord-123_A").is_ok());
        assert!(OrderId::parse("").is_err());
        assert!(OrderId::parse("has space").is_err());
        assert!(OrderId::parse(&"x".repeat(65)).is_err());
        assert!(Sku::parse("SKU-RED-1").is_ok());
        assert_eq!(Sku::parse("sku-lower").unwrap_err().field, "sku");
        assert!(serde_json::from_str::<Sku>("\"bad sku\"").is_err());
    }
}
