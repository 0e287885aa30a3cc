//! A minimal HTTP/1.1 client (one request per connection) for talking to the local HTTP API:
//! the demo reads the query side through it, and the tests call the API with it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn body_json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body).map_err(|e| anyhow::anyhow!("not JSON ({e}): {}", self.body))
    }

    /// The `Link` header's targets by `rel`.
    pub fn links(&self) -> BTreeMap<String, String> {
        self.header("link").map(parse_links).unwrap_or_default()
    }
}

/// `<url>; rel="next", <url>; rel="prev"` → {next: url, prev: url}.
pub fn parse_links(header: &str) -> BTreeMap<String, String> {
    header
        .split(", <")
        .filter_map(|part| {
            let part = part.trim().trim_start_matches('<');
            let (url, params) = part.split_once('>')?;
            let rel = params.split(';').find_map(|p| p.trim().strip_prefix("rel="))?;
            Some((rel.trim_matches('"').to_owned(), url.to_owned()))
        })
        .collect()
}

/// One HTTP/1.1 request over a fresh TCP connection (`Connection: close`).
pub async fn request(addr: SocketAddr, method: &str, target: &str, body: Option<&str>) -> anyhow::Result<HttpResponse> {
    request_with_headers(addr, method, target, &[], body).await
}

/// [`request`] with these headers as well.
pub async fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: system-tests\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        if let Some(body) = body {
            stream.write_all(body.as_bytes()).await?;
        }
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{method} {target}: no answer in 30 s"))??;
    parse_response(&raw).ok_or_else(|| anyhow::anyhow!("{method} {target}: not an HTTP response"))
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    if header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(length) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        if body.len() < length {
            return None;
        }
        body.truncate(length);
    }
    Some(HttpResponse { status, headers, body: String::from_utf8(body).ok()? })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_and_links_parse() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nLink: </a?after=3>; rel=\"next\", </a?after=0>; rel=\"prev\"\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body_json().unwrap()["a"], 1);
        let links = r.links();
        assert_eq!(links["next"], "/a?after=3");
        assert_eq!(links["prev"], "/a?after=0");
    }
}
