//! Structured logs: one JSON object per line, as CloudWatch Logs Insights reads them. The level
//! comes from `RUST_LOG` (the template sets `info`).

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Lambda stamps every line with its own time; the request id comes in the span fields.
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .without_time()
        .try_init();
    // In Lambda, the metrics recorder too (EMF lines on the same stdout).
    crate::metrics::init();
}
