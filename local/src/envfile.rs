//! `.local/aws.env`: the environment a local process needs to reach the emulators and the
//! provisioned resources, as `KEY='value'` lines that both `source` (bash) and [`parse`] read.

use std::collections::BTreeMap;

pub fn render(vars: &BTreeMap<String, String>) -> String {
    let mut out = String::from("# Written by `local-env provision`; regenerated on every run.\n");
    for (key, value) in vars {
        // Single quotes keep the value literal for bash; embedded quotes are closed and escaped.
        out.push_str(&format!("{key}='{}'\n", value.replace('\'', r"'\''")));
    }
    out
}

pub fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(v);
            (k.trim().to_owned(), v.replace(r"'\''", "'"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_values_with_quotes_and_spaces() {
        let vars = BTreeMap::from([
            ("A".to_owned(), "plain".to_owned()),
            ("B".to_owned(), "it's got spaces".to_owned()),
            ("C".to_owned(), "http://127.0.0.1:4566/queue/x".to_owned()),
        ]);
        assert_eq!(parse(&render(&vars)), vars);
    }
}
