//! Text decoding shared by the HTTP functions and the local HTTP emulation.

/// Decodes `%XX` escapes (and, in a query string, `+` as a space); invalid escapes stay as
/// they are.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let s = if plus_is_space { s.replace('+', " ") } else { s.to_owned() };
    percent_encoding::percent_decode_str(&s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_decode_and_invalid_ones_stay() {
        assert_eq!(percent_decode("a%20b+c", true), "a b c");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("100%", false), "100%");
        assert_eq!(percent_decode("%zz%41", false), "%zzA");
    }
}
