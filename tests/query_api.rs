//! The query API end to end: read models and events seeded in the emulators, then every route
//! called through the local HTTP server over real TCP, as a client would.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};
use shared::domain::{Currency, Money};
use shared::eventstore::{EventStore, InMemoryEventStore, NewEvent, RecordedEvent, StreamId};
use shared::readmodel::{
    CustomerOrder, InventoryLevel, OrderView, TimelineEntry, ViewStatus, customer_order_key, inventory_key, order_key,
};
use system_tests::http::{ApiEnv, HttpResponse, Json, QUERY_API, assert_clean_error, issuer, request_as};
use system_tests::{unique, workspace_root};

fn order_view(order_id: &str, customer_id: &str, versions: &[(&str, u64)]) -> OrderView {
    OrderView {
        order_id: order_id.into(),
        customer_id: customer_id.into(),
        status: ViewStatus::Completed,
        lines: serde_json::from_value(json!([{ "sku": "SKU-RED-MUG", "quantity": 2, "unitPriceMinor": 1250 }]))
            .expect("lines"),
        total: Some(Money::new(2500, Currency::EUR)),
        payment_id: Some("pay_1".into()),
        refund_id: None,
        shipment_id: Some("shp_1".into()),
        carrier: Some("sim".into()),
        cancellation_reason: None,
        failed_step: None,
        failed_actions: vec![],
        payment_pending_until: None,
        refund_pending_until: None,
        placed_at: "2026-11-20T10:00:00Z".into(),
        updated_at: "2026-11-20T10:00:04Z".into(),
        timeline: vec![TimelineEntry {
            at: "2026-11-20T10:00:00Z".into(),
            event: "OrderPlaced".into(),
            stream: format!("Order-{order_id}"),
            version: 1,
        }],
        versions: versions.iter().map(|(s, v)| ((*s).to_owned(), *v)).collect(),
    }
}

fn customer_order(order_id: &str, customer_id: &str, status: &str, placed_at: &str) -> CustomerOrder {
    CustomerOrder {
        order_id: order_id.into(),
        customer_id: customer_id.into(),
        status: ViewStatus::listed(status).expect("a listed status"),
        total: Some(Money::new(1000, Currency::EUR)),
        placed_at: placed_at.into(),
        gsi1pk: Some(format!("CUSTOMER#{customer_id}")),
        gsi1sk: Some(format!("{placed_at}#{order_id}")),
        versions: BTreeMap::from([(format!("Order-{order_id}"), 1)]),
    }
}

async fn append(env: &ApiEnv, stream: &StreamId, from: u64, count: u64) {
    let events = (from + 1..=from + count)
        .map(|n| NewEvent::new("TestHappened", 1, json!({ "n": n, "note": "seeded by the query API test" })))
        .collect();
    env.store.append(stream, from, events, None).await.expect("append");
}

fn order_ids(response: &HttpResponse) -> Vec<String> {
    let body = response.json();
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["orderId"].as_str().expect("orderId").to_owned())
        .collect()
}

fn versions(response: &HttpResponse) -> Vec<u64> {
    response.json()["events"].as_array().expect("events").iter().map(|e| e["version"].as_u64().expect("v")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_view_is_served_and_a_missing_order_is_404() {
    let env = ApiEnv::start().await;
    let id = unique("ord-");
    let view = order_view(&id, "cust-1", &[(&format!("Order-{id}"), 2), (&format!("Payment-{id}"), 2)]);
    env.put_model(order_key(&id), &view).await;

    let found = env.get(&format!("/orders/{id}")).await;
    assert_eq!(found.status, 200, "{}", found.body);
    assert!(found.header("content-type").is_some_and(|c| c.starts_with("application/json")));
    let body = found.json();
    assert_eq!(body, json!(view), "the view, nothing more");
    for storage in ["pk", "sk", "revision"] {
        assert!(body.get(storage).is_none(), "{storage} leaked: {body}");
    }
    assert_eq!(serde_json::from_value::<OrderView>(body).expect("an OrderView"), view);

    let missing = unique("ord-missing-");
    let not_found = env.get(&format!("/orders/{missing}")).await;
    assert_clean_error(&not_found, 404);
    assert_eq!(not_found.json(), json!({ "error": format!("order {missing} not found") }));

    assert_clean_error(&env.get("/orders/has%20space").await, 400);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_orders_come_newest_first_filtered_and_paged() {
    let env = ApiEnv::start().await;
    let customer = unique("cust-");
    // Seven orders a minute apart; statuses chosen so that "Completed" is sparse and the oldest.
    let statuses = ["Completed", "Placed", "Cancelled", "Placed", "Completed", "NeedsManualAction", "Placed"];
    let mut ids = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        let id = format!("{customer}-o{i}");
        let order = customer_order(&id, &customer, status, &format!("2026-11-20T10:0{i}:00Z"));
        env.put_model(customer_order_key(&id), &order).await;
        ids.push(id);
    }
    // Another customer's order, and an order view, must not show up.
    let other = unique("cust-");
    env.put_model(
        customer_order_key(&format!("{other}-o")),
        &customer_order(&format!("{other}-o"), &other, "Placed", "2026-11-20T11:00:00Z"),
    )
    .await;
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    let base = format!("/customers/{customer}/orders");

    let all = env.get(&base).await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(order_ids(&all), newest_first);
    assert_eq!(all.json()["nextCursor"], Value::Null);
    assert!(all.header("link").is_none(), "no next page: {:?}", all.header("link"));
    let first = &all.json()["items"][0];
    assert_eq!(first["status"], "Placed");
    assert_eq!(first["customerId"], customer.as_str());
    assert!(first.get("gsi1pk").is_none() && first.get("pk").is_none(), "storage keys leaked: {first}");
    serde_json::from_value::<CustomerOrder>(first.clone()).expect("a CustomerOrder");

    // Pages of 3, followed through the Link header: 3 + 3 + 1, never an empty page.
    let mut seen = Vec::new();
    let mut target = format!("{base}?limit=3");
    let mut pages = Vec::new();
    loop {
        let page = env.get(&target).await;
        assert_eq!(page.status, 200, "{target}: {}", page.body);
        let items = order_ids(&page);
        pages.push(items.len());
        seen.extend(items);
        let cursor = page.json()["nextCursor"].clone();
        match page.links().get("next") {
            Some(next) => {
                let cursor = cursor.as_str().expect("a cursor with a next link");
                assert!(next.contains(&format!("cursor={cursor}")) && next.contains("limit=3"), "{next}");
                assert!(cursor.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{cursor}");
                target = next.clone();
            }
            None => {
                assert_eq!(cursor, Value::Null);
                break;
            }
        }
    }
    assert_eq!(pages, vec![3, 3, 1]);
    assert_eq!(seen, newest_first);

    // Exactly a page's worth: no next page that would be empty.
    let exact = env.get(&format!("{base}?limit=7")).await;
    assert_eq!(order_ids(&exact).len(), 7);
    assert_eq!(exact.json()["nextCursor"], Value::Null);

    // A filter keeps querying past non-matching orders: pages are full, and never empty.
    let completed: Vec<String> = newest_first
        .iter()
        .zip(statuses.iter().rev())
        .filter(|(_, s)| **s == "Completed")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(completed.len(), 2);
    let page1 = env.get(&format!("{base}?status=Completed&limit=1")).await;
    assert_eq!(order_ids(&page1), completed[..1]);
    let next = page1.links()["next"].clone();
    assert!(next.contains("status=Completed"), "{next}");
    let page2 = env.get(&next).await;
    assert_eq!(order_ids(&page2), completed[1..]);
    assert_eq!(page2.json()["nextCursor"], Value::Null, "the oldest match ends the listing");
    let placed = env.get(&format!("{base}?status=Placed")).await;
    assert_eq!(order_ids(&placed).len(), 3);
    assert!(placed.json()["items"].as_array().unwrap().iter().all(|i| i["status"] == "Placed"));
    // One match behind 60 that do not: found across several queries, on the first page.
    let sparse = unique("cust-");
    let seeding = (0..61).map(|i| {
        let id = format!("{sparse}-o{i:02}");
        let status = if i == 0 { "Cancelled" } else { "Placed" };
        let order = customer_order(&id, &sparse, status, &format!("2026-11-20T10:{i:02}:00Z"));
        let env = &env;
        async move { env.put_model(customer_order_key(&id), &order).await }
    });
    futures::future::join_all(seeding).await;
    let found = env.get(&format!("/customers/{sparse}/orders?status=Cancelled&limit=1")).await;
    assert_eq!(order_ids(&found), [format!("{sparse}-o00")]);
    assert_eq!(found.json()["nextCursor"], Value::Null);
    let page = env.get(&format!("/customers/{sparse}/orders?status=Placed&limit=30")).await;
    assert_eq!(order_ids(&page).len(), 30);
    let rest = env.get(&page.links()["next"]).await;
    assert_eq!(order_ids(&rest).len(), 30);
    assert_eq!(rest.json()["nextCursor"], Value::Null, "the 30 remaining Placed orders fill the page exactly");
    let none = env.get(&format!("/customers/{}/orders", unique("cust-nobody-"))).await;
    assert_eq!(none.json(), json!({ "items": [], "nextCursor": null }));

    // Bad input is a 400 with a JSON reason.
    for bad in [
        format!("{base}?status=Shipped"),
        format!("{base}?status=placed"),
        format!("{base}?limit=0"),
        format!("{base}?limit=101"),
        format!("{base}?limit=ten"),
        format!("{base}?cursor=not-a-cursor"),
        format!("{base}?cursor=%7B%7D"),
        "/customers/bad%20id/orders".to_owned(),
    ] {
        assert_clean_error(&env.get(&bad).await, 400);
    }
    // A cursor of another customer's listing is refused, not followed.
    let theirs = env.get(&format!("/customers/{other}/orders?limit=1")).await;
    assert_eq!(order_ids(&theirs).len(), 1);
    let mine = env.get(&format!("{base}?limit=1")).await;
    let cursor = mine.json()["nextCursor"].as_str().expect("cursor").to_owned();
    assert_clean_error(&env.get(&format!("/customers/{other}/orders?cursor={cursor}")).await, 400);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_feed_pages_and_a_poller_catches_up() {
    let env = ApiEnv::start().await;
    let stream = StreamId::new("Order", &unique("feed-")).expect("stream id");
    append(&env, &stream, 0, 7).await;
    let base = format!("/streams/{stream}/events");

    let first = env.get(&format!("{base}?limit=3")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let body = first.json();
    assert_eq!(body["stream"], stream.as_str());
    assert_eq!(body["head"], 7);
    assert_eq!(versions(&first), [1, 2, 3]);
    let events: Vec<RecordedEvent> = serde_json::from_value(body["events"].clone()).expect("recorded events");
    let stored = env.store.load(&stream, 0).await.expect("load");
    assert_eq!(events, stored[..3], "the feed serves the store's envelopes");
    assert_eq!(first.links(), BTreeMap::from([("next".into(), format!("{base}?after=3&limit=3"))]));

    let second = env.get(&first.links()["next"]).await;
    assert_eq!(versions(&second), [4, 5, 6]);
    assert_eq!(
        second.links(),
        BTreeMap::from([
            ("next".into(), format!("{base}?after=6&limit=3")),
            ("prev".into(), format!("{base}?after=0&limit=3")),
        ])
    );
    let third = env.get(&second.links()["next"]).await;
    assert_eq!(versions(&third), [7]);
    assert_eq!(third.links(), BTreeMap::from([("prev".into(), format!("{base}?after=3&limit=3"))]));
    let clamped = env.get(&format!("{base}?after=2&limit=3")).await;
    assert_eq!(clamped.links()["prev"], format!("{base}?after=0&limit=3"), "prev never goes below 0");

    // A poller that has everything gets nothing, and no next link; new events then arrive.
    let caught_up = env.get(&format!("{base}?after=7")).await;
    assert_eq!(caught_up.status, 200);
    assert_eq!(versions(&caught_up), Vec::<u64>::new());
    assert_eq!(caught_up.json()["head"], 7);
    assert!(!caught_up.links().contains_key("next"));
    append(&env, &stream, 7, 2).await;
    let mut after = 7;
    let mut polled: Vec<u64> = Vec::new();
    loop {
        let page = env.get(&format!("{base}?after={after}&limit=1")).await;
        let got = versions(&page);
        polled.extend(&got);
        after = got.last().copied().unwrap_or(after);
        if !page.links().contains_key("next") {
            assert_eq!(page.json()["head"], 9);
            break;
        }
    }
    assert_eq!(polled, [8, 9]);
    assert_eq!(versions(&env.get(&base).await), (1..=9).collect::<Vec<u64>>(), "default limit 100");

    for bad in [
        "/streams/nope/events".to_owned(),
        "/streams/Order-a%2Fb/events".to_owned(),
        format!("{base}?after=-1"),
        format!("{base}?after=abc"),
        format!("{base}?limit=0"),
        format!("{base}?limit=1001"),
    ] {
        assert_clean_error(&env.get(&bad).await, 400);
    }
    let empty = env.get(&format!("/streams/Order-{}/events", unique("empty-"))).await;
    assert_clean_error(&empty, 404);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_page_reads_one_page_in_every_store() {
    let env = ApiEnv::start().await;
    let stream = StreamId::new("Order", &unique("page-")).expect("stream id");
    append(&env, &stream, 0, 5).await;
    let memory = InMemoryEventStore::new();
    memory.append(&stream, 0, (1..=5).map(|n| NewEvent::new("T", 1, json!({ "n": n }))).collect(), None).await.unwrap();
    let page = |events: Vec<RecordedEvent>| events.iter().map(|e| e.version).collect::<Vec<_>>();
    assert_eq!(page(env.store.read_page(&stream, 1, 3).await.unwrap()), [2, 3, 4]);
    assert_eq!(page(env.store.read_page(&stream, 3, 10).await.unwrap()), [4, 5]);
    assert_eq!(page(env.store.read_page(&stream, 5, 10).await.unwrap()), Vec::<u64>::new());
    assert_eq!(page(memory.read_page(&stream, 1, 3).await.unwrap()), [2, 3, 4]);
    assert_eq!(page(memory.read_page(&stream, 3, 10).await.unwrap()), [4, 5]);
    assert_eq!(env.store.read_page(&stream, 0, 5).await.unwrap(), env.store.load(&stream, 0).await.unwrap());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_shows_how_far_each_read_model_is_behind() {
    let env = ApiEnv::start().await;
    let id = unique("lag-");
    let order = StreamId::new("Order", &id).expect("stream id");
    let payment = StreamId::new("Payment", &id).expect("stream id");
    append(&env, &order, 0, 3).await;
    append(&env, &payment, 0, 2).await;
    env.put_model(order_key(&id), &order_view(&id, "cust-1", &[(order.as_str(), 2), (payment.as_str(), 2)])).await;
    let mut row = customer_order(&id, "cust-1", "Completed", "2026-11-20T10:00:00Z");
    row.versions = BTreeMap::from([(order.to_string(), 3)]);
    env.put_model(customer_order_key(&id), &row).await;

    let lag = env.get(&format!("/streams/{order}/lag")).await;
    assert_eq!(lag.status, 200, "{}", lag.body);
    assert_eq!(
        lag.json(),
        json!({
            "stream": order.as_str(),
            "head": 3,
            "applied": { "order-view": 2, "customer-orders": 3 },
            "behind": { "order-view": 1, "customer-orders": 0 },
        })
    );
    // The projection catches up.
    env.put_model(order_key(&id), &order_view(&id, "cust-1", &[(order.as_str(), 3), (payment.as_str(), 2)])).await;
    let lag = env.get(&format!("/streams/{order}/lag")).await.json();
    assert_eq!(lag["behind"], json!({ "order-view": 0, "customer-orders": 0 }));

    let lag = env.get(&format!("/streams/{payment}/lag")).await.json();
    assert_eq!(
        lag,
        json!({ "stream": payment.as_str(), "head": 2, "applied": { "order-view": 2 }, "behind": { "order-view": 0 } })
    );

    // Stock: the inventory level model; a model that has not seen the stream yet is all behind.
    let sku = format!("SKU-{}", unique("").to_ascii_uppercase());
    let inventory = StreamId::new("Inventory", &sku).expect("stream id");
    append(&env, &inventory, 0, 4).await;
    let lag = env.get(&format!("/streams/{inventory}/lag")).await.json();
    assert_eq!(lag["applied"], json!({ "inventory-levels": 0 }));
    assert_eq!(lag["behind"], json!({ "inventory-levels": 4 }));
    let level = InventoryLevel {
        sku: sku.clone(),
        available: 10,
        reserved: 0,
        versions: BTreeMap::from([(inventory.to_string(), 4)]),
    };
    env.put_model(inventory_key(&sku), &level).await;
    let lag = env.get(&format!("/streams/{inventory}/lag")).await.json();
    assert_eq!(lag["behind"], json!({ "inventory-levels": 0 }));

    assert_clean_error(&env.get("/streams/bad/lag").await, 400);
    assert_clean_error(&env.get(&format!("/streams/Order-{}/lag", unique("none-"))).await, 404);
    let untracked = StreamId::new("Customer", &unique("c-")).expect("stream id");
    append(&env, &untracked, 0, 1).await;
    assert_clean_error(&env.get(&format!("/streams/{untracked}/lag")).await, 404);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_api_gateways_head_limit_are_refused_with_json() {
    // Given the HTTP API
    let env = ApiEnv::start().await;
    // When a request line is 60 KB long (its query string; an HTTP client builds no URI over 64 KB)
    let long = format!("/customers/c-1/orders?status={}", "x".repeat(60 * 1024));
    let answer = env.request("GET", &long, None).await;
    // Then it is a 414 with a JSON error naming the limit
    assert_clean_error(&answer, 414);
    assert!(answer.body.contains("10240 bytes"), "{}", answer.body);
    // When the headers together are over 10 KB
    let big = "h".repeat(11 * 1024);
    let answer =
        system_tests::http::request_with_headers(env.addr(), "GET", "/orders/o-1", &[("x-big", &big)], None).await;
    // Then it is a 431, also JSON
    assert_clean_error(&answer, 431);
    // And a request within the limit reaches the function (its 400: no such status)
    let within = format!("/customers/c-1/orders?status={}", "x".repeat(8 * 1024));
    assert_eq!(env.request("GET", &within, None).await.status, 400);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_are_405_and_unknown_routes_404() {
    let env = ApiEnv::start().await;
    let deleted = env.request("DELETE", "/orders/ord-1", None).await;
    assert_clean_error(&deleted, 405);
    assert_eq!(deleted.header("allow"), Some("GET"));
    let posted = env.request("POST", "/streams/Order-1/events", Some("{}")).await;
    assert_clean_error(&posted, 405);
    // place-order's route is served by the same server: GET is not one of its methods.
    let listed = env.get("/orders").await;
    assert_clean_error(&listed, 405);
    assert_eq!(listed.header("allow"), Some("POST"));
    for unknown in ["/", "/nope", "/orders/a/b", "/customers/c-1", "/streams/Order-1"] {
        assert_clean_error(&env.get(unknown).await, 404);
    }
    // The function answers the same way when invoked directly with a request it has no route for.
    let direct = |method: &str, path: &str| {
        json!({ "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
                "requestContext": { "http": { "method": method, "path": path } } })
    };
    let answer = env.service.invoke_json(QUERY_API, &direct("DELETE", "/orders/ord-1")).await.expect("invoked");
    assert_eq!(answer["statusCode"], 405);
    assert_eq!(answer["headers"]["allow"], "GET");
    let answer = env.service.invoke_json(QUERY_API, &direct("GET", "/nope")).await.expect("invoked");
    assert_eq!(answer["statusCode"], 404);
    assert!(serde_json::from_str::<Value>(answer["body"].as_str().unwrap()).unwrap()["error"].is_string());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_are_500_without_sdk_text() {
    // The query API pointed at tables that do not exist: every read fails in the SDK.
    let env = ApiEnv::start().await;
    let mut broken = env.stack.clone();
    let vars = broken.functions.get_mut(QUERY_API).expect("query api env");
    for table in ["READ_MODEL_TABLE", "EVENTS_TABLE"] {
        vars.insert(table.into(), unique("missing-table-"));
    }
    let broken_service = env.aws.lambda_service(&broken);
    let server =
        local_env::http::serve(&broken, broken_service.clone(), ([127, 0, 0, 1], 0).into()).await.expect("serve");
    for target in ["/orders/ord-1", "/customers/cust-1/orders", "/streams/Order-1/events", "/streams/Order-1/lag"] {
        let response = request_as(server.addr(), "GET", target, Some(&issuer().operator_bearer()), None).await;
        assert_clean_error(&response, 500);
        assert_eq!(response.json(), json!({ "error": "internal error" }), "{target}");
    }
    server.stop().await;
    broken_service.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_api_sample_event_is_accepted() {
    let env = ApiEnv::start().await;
    let routes: HashMap<String, String> =
        local_env::http::routes(&env.stack).expect("routes").into_iter().map(|r| (r.route_key(), r.function)).collect();
    let mut checked = 0;
    for file in std::fs::read_dir(workspace_root().join("events/query-api")).expect("events/query-api") {
        let path = file.expect("entry").path();
        let sample: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        let route_key = sample["routeKey"].as_str().expect("routeKey");
        assert_eq!(routes.get(route_key).map(String::as_str), Some(QUERY_API), "{}: {route_key}", path.display());
        let answer = env.service.invoke_json(QUERY_API, &sample).await.expect("invoked");
        let status = answer["statusCode"].as_u64().expect("statusCode");
        assert!(status == 200 || status == 404, "{}: {answer}", path.display());
        assert_eq!(answer["headers"]["content-type"], "application/json", "{}", path.display());
        let body: Value = serde_json::from_str(answer["body"].as_str().expect("body")).expect("a JSON body");
        assert!(body.is_object(), "{}: {body}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 4, "one sample per route");
    env.stop().await;
}
