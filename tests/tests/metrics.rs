//! `/metrics` after a real scenario: the origin (with nats-server, so K/V, bus and bridge
//! are the NATS ones) serves a login, a validation, a `/noetl` proxy call, an SSE stream
//! (the lean path) and a GraphQL playbook run whose callback and bridge frames reach the
//! stream; then the exposition is parsed and the histograms and counters of the issue-14
//! catalogue must show exactly those routes and outcomes. And `METRICS_ENABLED=false`
//! turns `/metrics` into a 404.

use std::time::Duration;

use gateway_tests::harness::flows::{http, login, open_events_client, run_playbook};
use gateway_tests::harness::metrics::{find, parse, sum, Sample};
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::wait_for;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// `<name>_count` of the histogram series with `labels` (summed over the rest).
fn count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    sum(samples, &format!("{name}_count"), labels)
}

/// Every series of histogram `name` is well formed: cumulative buckets ending in `+Inf`,
/// whose value is the series' `_count`.
fn assert_histogram_consistent(samples: &[Sample], name: &str) {
    let counts = find(samples, &format!("{name}_count"), &[]);
    assert!(!counts.is_empty(), "no {name} series");
    for c in counts {
        let labels: Vec<(&str, &str)> = c
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let buckets: Vec<&Sample> = find(samples, &format!("{name}_bucket"), &labels)
            .into_iter()
            .filter(|b| b.labels.len() == labels.len() + 1)
            .collect();
        assert!(buckets.len() >= 2, "{name}{labels:?} has no buckets");
        let values: Vec<f64> = buckets.iter().map(|b| b.value).collect();
        assert!(
            values.windows(2).all(|w| w[0] <= w[1]),
            "{name}{labels:?}: buckets are not cumulative: {values:?}"
        );
        let inf = buckets.last().unwrap();
        assert_eq!(inf.labels["le"], "+Inf", "{name}{labels:?}");
        assert_eq!(inf.value, c.value, "{name}{labels:?}: +Inf bucket != count");
        assert!(
            !find(samples, &format!("{name}_sum"), &labels).is_empty(),
            "{name}{labels:?} has no _sum"
        );
    }
}

#[tokio::test]
async fn a_scenario_shows_up_in_the_histograms_by_route_and_outcome() {
    let demo = gateway_tests::harness::demo::DemoService::start(Default::default())
        .await
        .unwrap();
    let (_nats, standin, mut origins) = gateway_tests::harness::flows::nats_stack_with(
        1,
        Default::default(),
        &[("SERVICE_DEMO_URL", demo.base_url())],
    )
    .await;
    let origin = origins.pop().unwrap();
    let token = login(&origin.url, &standin, "metrics@example.com").await;
    let r = http()
        .post(format!("{}/api/auth/validate", origin.url))
        .json(&json!({"session_token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http()
        .get(format!("{}/noetl/catalog/playbooks", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http()
        .get(format!("{}/api/v1/demo/echo", origin.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (mut sse, client_id) =
        open_events_client(&format!("{}/events", origin.url), &token, None, WAIT).await;
    let execution_id = run_playbook(
        &origin.url,
        &token,
        "demo/steps",
        json!({"n": 1}),
        Some(&client_id),
    )
    .await;
    let frames = sse
        .collect_until(WAIT, |fs| {
            fs.iter().any(|f| f.event == "playbook/result")
                && fs
                    .iter()
                    .any(|f| f.event == "playbook/state" && f.data["params"]["terminal"] == true)
        })
        .await;
    assert!(
        frames.iter().any(|f| f.event == "playbook/result"),
        "run {execution_id}: no result frame in {frames:?}"
    );

    // The stream is open, so its request has been measured (time to its head).
    let text = origin.metrics_text().await.expect("/metrics answers");
    let s = parse(&text);
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends in # EOF"
    );

    // Exactly the catalogue's families (names and types): the chart's dashboard and alert
    // rules are written against it.
    let types: std::collections::BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let catalogue: std::collections::BTreeMap<&str, &str> =
        gateway_tests::harness::metrics::CATALOGUE
            .iter()
            .copied()
            .collect();
    // OpenMetrics names a counter family without `_total`; its samples carry it.
    assert_eq!(types, catalogue, "the metric catalogue");

    // HTTP, by listener, route template, method and status — the lean /events path too.
    let http_hist = "gateway_http_request_duration_seconds";
    for (listener, route, method, status) in [
        ("public", "/api/auth/login", "POST", "200"),
        ("public", "/api/auth/validate", "POST", "200"),
        ("public", "/noetl/{*rest}", "GET", "200"),
        ("public", "/events", "GET", "200"),
        ("public", "/graphql", "POST", "200"),
        ("internal", "/api/internal/callback/async", "POST", "200"),
    ] {
        let labels = [
            ("listener", listener),
            ("route", route),
            ("method", method),
            ("status", status),
        ];
        assert!(
            count(&s, http_hist, &labels) >= 1.0,
            "no {http_hist} count for {labels:?}\n{text}"
        );
    }
    assert!(
        s.iter()
            .filter(|x| x.name == format!("{http_hist}_count"))
            .all(|x| !x.labels["route"].contains("catalog")
                && !x.labels["route"].contains(&client_id)),
        "routes are templates, never raw paths"
    );
    assert_histogram_consistent(&s, http_hist);
    assert_eq!(
        sum(
            &s,
            "gateway_http_requests_in_flight",
            &[("listener", "public")]
        ),
        0.0,
        "nothing is being answered now (the open stream's head was sent)"
    );

    // NoETL calls by route template and outcome, the proxy as `proxy`.
    let noetl = "gateway_noetl_request_duration_seconds";
    for route in [
        "/api/auth/login",
        "/api/auth/check-playbook-access",
        "/api/execute",
        "proxy",
    ] {
        assert!(
            count(&s, noetl, &[("route", route), ("outcome", "ok")]) >= 1.0,
            "no ok {noetl} for {route}\n{text}"
        );
    }
    assert_histogram_consistent(&s, noetl);

    // A registered service, by its name.
    let svc = "gateway_service_request_duration_seconds";
    assert_eq!(
        count(&s, svc, &[("service", "demo"), ("outcome", "ok")]),
        1.0,
        "the one proxied call to the demo service\n{text}"
    );
    assert_histogram_consistent(&s, svc);

    // K/V (NATS) and bus operations.
    let kv = "gateway_kv_operation_duration_seconds";
    assert!(count(&s, kv, &[("bucket", "sessions"), ("outcome", "ok")]) >= 1.0);
    assert!(
        count(
            &s,
            kv,
            &[("bucket", "requests"), ("op", "create"), ("outcome", "ok")]
        ) >= 1.0,
        "the callback's delivered marker\n{text}"
    );
    assert!(count(&s, kv, &[("bucket", "interest"), ("outcome", "ok")]) >= 1.0);
    assert_histogram_consistent(&s, kv);
    let bus = "gateway_bus_operation_duration_seconds";
    assert!(count(&s, bus, &[("op", "publish"), ("outcome", "ok")]) >= 2.0);
    // The scenario's stream is a new client's: subscribed before its id is stored, so
    // nothing is read back (`subscribe`, not `replay`).
    assert!(count(&s, bus, &[("op", "subscribe"), ("outcome", "ok")]) >= 1.0);

    // The bridge: frames published for NoETL's events, with their lag.
    assert!(
        count(&s, "gateway_bridge_lag_seconds", &[]) >= 1.0,
        "bridge lag\n{text}"
    );
    assert_histogram_consistent(&s, "gateway_bridge_lag_seconds");
    assert!(sum(&s, "gateway_bridge_events_total", &[("outcome", "handled")]) >= 1.0);
    assert_eq!(
        sum(&s, "gateway_bridge_reader", &[]),
        1.0,
        "the only replica reads"
    );

    // SSE, callbacks, build info, readiness.
    assert_eq!(sum(&s, "gateway_sse_streams_open", &[]), 1.0);
    assert!(sum(&s, "gateway_sse_streams_total", &[]) >= 1.0);
    assert!(sum(&s, "gateway_callbacks_total", &[("outcome", "delivered")]) >= 1.0);
    let info = find(&s, "gateway_build_info", &[]);
    assert_eq!(info.len(), 1, "{text}");
    assert_eq!(info[0].value, 1.0);
    assert_eq!(info[0].labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!info[0].labels["commit"].is_empty());
    assert_eq!(sum(&s, "gateway_auth_validate_requests_total", &[]), 1.0);
    let r = reqwest::get(format!("{}/ready", origin.internal_url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(origin.metric("gateway_ready").await, Some(1));

    // The scrape itself is measured on the internal listener.
    let again = parse(&origin.metrics_text().await.unwrap());
    assert!(
        count(
            &again,
            http_hist,
            &[
                ("listener", "internal"),
                ("route", "/metrics"),
                ("status", "200")
            ]
        ) >= 1.0
    );
    sse.close();
    wait_for("the stream to be counted closed", WAIT, || async {
        origin.sse_connections().await == Some(0)
    })
    .await;
}

#[tokio::test]
async fn metrics_disabled_answer_404_and_requests_still_work() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = Origin::start(
        &standin,
        OriginOptions::default().env("METRICS_ENABLED", "false"),
    )
    .await
    .unwrap();
    let token = login(&origin.url, &standin, "off@example.com").await;
    assert!(!token.is_empty());
    let r = reqwest::get(format!("{}/metrics", origin.internal_url))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}
