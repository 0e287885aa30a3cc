//! Text decoding shared by the HTTP functions and the local HTTP emulation.

/// Decodes `%XX` escapes (and, in a query string, `+` as a space); invalid escapes stay as
/// they are.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let s = if plus_is_space { s.replace('+', " ") } else { s.to_owned() };
    percent_encoding::percent_decode_str(&s).decode_utf8_lossy().into_owned()
}

/// The longest reason (why a message was dead-lettered or refused) that quotes its input: a
/// decoder's error message may quote a whole field of it.
pub const MAX_REASON: usize = 1024;

/// `text` cut to at most `max` bytes (at least 3), on a character boundary, ending in `…` when
/// cut: for error messages and reasons that quote their input.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
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

    #[test]
    fn bounded_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("abcdefghij", 6), "abc…");
        assert_eq!(bounded("ééééé", 6), "é…");
        assert!(bounded(&"€".repeat(1000), MAX_REASON).len() <= MAX_REASON);
    }
}
