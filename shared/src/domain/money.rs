//! Money as integer minor units with a known currency: never a float.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Currency {
    EUR,
    USD,
    GBP,
    CHF,
    JPY,
}

impl Currency {
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "EUR" => Some(Self::EUR),
            "USD" => Some(Self::USD),
            "GBP" => Some(Self::GBP),
            "CHF" => Some(Self::CHF),
            "JPY" => Some(Self::JPY),
            _ => None,
        }
    }

    /// Digits after the decimal point (ISO 4217 exponent).
    pub fn exponent(self) -> u32 {
        match self {
            Self::JPY => 0,
            _ => 2,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Money {
    /// Amount in the currency's minor unit (cents for EUR).
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Self { amount_minor, currency }
    }

    pub fn zero(currency: Currency) -> Self {
        Self::new(0, currency)
    }

    /// `None` on overflow or a currency mismatch.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        (self.currency == other.currency)
            .then(|| self.amount_minor.checked_add(other.amount_minor))
            .flatten()
            .map(|amount_minor| Money::new(amount_minor, self.currency))
    }

    pub fn checked_mul(self, factor: u32) -> Option<Money> {
        self.amount_minor.checked_mul(i64::from(factor)).map(|amount_minor| Money::new(amount_minor, self.currency))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exp = self.currency.exponent();
        if exp == 0 {
            return write!(f, "{} {}", self.amount_minor, self.currency);
        }
        let unit = 10i64.pow(exp);
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let abs = self.amount_minor.unsigned_abs();
        write!(f, "{sign}{}.{:0width$} {}", abs / unit as u64, abs % unit as u64, self.currency, width = exp as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked_and_currency_safe() {
        let a = Money::new(1_999, Currency::EUR);
        assert_eq!(a.checked_mul(3), Some(Money::new(5_997, Currency::EUR)));
        assert_eq!(a.checked_add(Money::new(1, Currency::EUR)), Some(Money::new(2_000, Currency::EUR)));
        assert_eq!(a.checked_add(Money::new(1, Currency::USD)), None, "no mixing currencies");
        assert_eq!(Money::new(i64::MAX, Currency::EUR).checked_mul(2), None);
    }

    #[test]
    fn displays_in_major_units() {
        assert_eq!(Money::new(123_456, Currency::EUR).to_string(), "1234.56 EUR");
        assert_eq!(Money::new(-5, Currency::USD).to_string(), "-0.05 USD");
        assert_eq!(Money::new(500, Currency::JPY).to_string(), "500 JPY");
        assert_eq!(Currency::parse("GBP"), Some(Currency::GBP));
        assert_eq!(Currency::parse("XYZ"), None);
    }
}
