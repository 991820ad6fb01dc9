//! The wasm↔JS boundary on the hot path: what crosses it, and how often.
//!
//! Every string that crosses between wasm and the runtime is re-encoded (wasm-bindgen's
//! glue calls workerd's `TextEncoder`/`TextDecoder`, a native API call, plus an allocation
//! in wasm), and every awaited promise costs a closure pair and a microtask. Measured on
//! plain workerd (docs/BENCHMARKS.md, "Edge CPU against the same steps in JS"), going
//! through workers-rs' `Request`/`Response`/`Headers` wrappers header by header made the
//! edge cost more CPU per request than the same steps written in JS, with no single hot
//! spot. So the hot path crosses in bulk instead:
//!
//! - a request's method, URL and every header come in as **one** string ([`Head`]), kept
//!   whole and read through offsets; the URL's path and query are split from the
//!   runtime's serialisation, not parsed again ([`RequestUrl`]);
//! - the forwarded request's headers go out as **one** string, and the fetch, with its
//!   header timeout (an `AbortController` and a timer), runs in JS: one promise to await,
//!   no Rust timer closure and no `select` (`fetch_origin`); the assertion's signing
//!   input goes with it and WebCrypto signs it there, so the signature needs no promise
//!   of its own and never crosses into wasm and back (`crate::sign`);
//! - the two rate-limit calls of a session request are one call and one promise (each
//!   binding looked up by name in JS);
//! - the origin's status and headers come in as one string, and the response the client
//!   gets is built in JS around the origin's own body stream and WebSocket from one
//!   string of headers (`respond`).
//!
//! The JS here only transports: which headers are kept, dropped or added, and what a
//! timeout means, are decided in Rust (`forward`, `reply`), and the encoding is pure
//! Rust tested on the host. The separator is `\n`: the Fetch API refuses CR and LF in
//! header values, header names are tokens, and a serialised URL has neither, so a value
//! never contains it ([`push`] skips a pair that would, as `Headers` would refuse it).

/// The separator between the fields of a [`Head`] and of a header list.
pub const SEP: char = '\n';

/// A request's or response's head as the runtime gave it: the first line(s), then the
/// headers as the Fetch API iterates them (names lower-case, repeated fields joined with
/// `, `, `set-cookie` one entry per cookie). Held as the one string that crossed, with the
/// offsets of its fields: no allocation per header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    raw: String,
    first: (usize, usize),
    url: (usize, usize),
    /// `(name, value)` spans in the runtime's order.
    headers: Vec<[(usize, usize); 2]>,
}

impl Head {
    /// Parses `method \n url \n name \n value …` (`with_url`), or `status \n name \n
    /// value …`. A trailing name without a value is ignored.
    pub fn parse(raw: String, with_url: bool) -> Self {
        let base = raw.as_ptr() as usize;
        let span = |part: &str| {
            let at = part.as_ptr() as usize - base;
            (at, at + part.len())
        };
        let mut parts = raw.split(SEP);
        let first = parts.next().map_or((0, 0), span);
        let url = if with_url {
            parts.next().map_or((0, 0), span)
        } else {
            (0, 0)
        };
        let mut headers = Vec::with_capacity(16);
        while let (Some(n), Some(v)) = (parts.next(), parts.next()) {
            headers.push([span(n), span(v)]);
        }
        Self {
            first,
            url,
            headers,
            raw,
        }
    }

    fn at(&self, (from, to): (usize, usize)) -> &str {
        &self.raw[from..to]
    }

    /// The method (a request) or the status as digits (a response).
    pub fn first(&self) -> &str {
        self.at(self.first)
    }

    /// The URL (a request); empty for a response.
    pub fn url(&self) -> &str {
        self.at(self.url)
    }

    /// `(name, value)` in the runtime's order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|&[n, v]| (self.at(n), self.at(v)))
    }

    /// The value of header `name` (lower-case, as the runtime gives names).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The status of a response head (0 if it is not a number).
    pub fn status(&self) -> u16 {
        self.first().parse().unwrap_or(0)
    }
}

/// The path and query of a request's URL as the runtime serialised it (the Fetch API's
/// `request.url`: absolute and normalised by the WHATWG URL parser), split without a
/// second parse: the parse is the runtime's, done once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestUrl<'a> {
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> RequestUrl<'a> {
    /// Splits `url`; `Err` when it is not absolute (`scheme://…`), which a runtime's
    /// request URL always is.
    pub fn split(url: &'a str) -> Result<Self, &'static str> {
        let Some((_, rest)) = url.split_once("://") else {
            return Err("not an absolute URL");
        };
        let rest = &rest[rest.find(['/', '?', '#']).unwrap_or(rest.len())..];
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        Ok(Self {
            path: if path.is_empty() { "/" } else { path },
            query,
        })
    }

    /// The path, percent-encoded as serialised (`/` at least).
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The query without its `?` (`Some("")` for a bare `?`), as serialised.
    pub fn query(&self) -> Option<&'a str> {
        self.query
    }
}

/// Appends one header to a list for `fetch_origin` / `respond`; a pair the Fetch
/// API would refuse (empty name, CR or LF anywhere) is left out.
pub fn push(list: &mut String, name: &str, value: &str) {
    let bad = |s: &str| s.contains(['\n', '\r']);
    if name.is_empty() || bad(name) || bad(value) {
        return;
    }
    if !list.is_empty() {
        list.push(SEP);
    }
    list.push_str(name);
    list.push(SEP);
    list.push_str(value);
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::Head;
    use worker::js_sys::Promise;
    use worker::wasm_bindgen::prelude::*;
    use worker::wasm_bindgen::JsCast;
    use worker::wasm_bindgen_futures::JsFuture;
    use worker::worker_sys::web_sys;

    #[wasm_bindgen(inline_js = r#"
function headersOf(list) {
  const h = new Headers();
  if (list) {
    const p = list.split("\n");
    for (let i = 0; i + 1 < p.length; i += 2) h.append(p[i], p[i + 1]);
  }
  return h;
}
export function requestHead(r) {
  let s = r.method + "\n" + r.url;
  for (const [n, v] of r.headers) s += "\n" + n + "\n" + v;
  return s;
}
export function responseHead(r) {
  let s = "" + r.status;
  for (const [n, v] of r.headers) s += "\n" + n + "\n" + v;
  return s;
}
const encoder = new TextEncoder();
function b64url(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
export async function fetchOrigin(packed, body, manual, ms, key) {
  // method, url, then header pairs; with a key, the last pair's value is a signing input.
  const p = packed.split("\n");
  const method = p[0], url = p[1];
  const last = key ? p.length - 2 : p.length;
  const headers = new Headers();
  for (let i = 2; i + 1 < p.length && i < last; i += 2) headers.append(p[i], p[i + 1]);
  if (key) {
    const input = p[last + 1];
    let sig;
    try {
      sig = await crypto.subtle.sign("Ed25519", key, encoder.encode(input));
    } catch (e) {
      return "" + (e?.message ?? e);
    }
    headers.set(p[last], input + "." + b64url(new Uint8Array(sig)));
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), ms);
  const init = { method, headers, signal: controller.signal };
  if (body !== undefined && body !== null) init.body = body;
  if (manual) init.redirect = "manual";
  try {
    return await fetch(url, init);
  } catch (e) {
    if (controller.signal.aborted) return null;
    throw e;
  } finally {
    clearTimeout(timer);
  }
}
function limitOne(env, name, key) {
  const binding = env[name];
  if (binding === undefined || binding === null) return 2;
  try {
    return binding.limit({ key }).then((r) => (r?.success === true ? 1 : 0), (e) => e);
  } catch (e) {
    return e;
  }
}
export function rateLimit(env, name, key) {
  return Promise.resolve(limitOne(env, name, key));
}
export function rateLimits(env, a, keyA, b, keyB) {
  return Promise.all([limitOne(env, a, keyA), limitOne(env, b, keyB)]);
}
export function respond(from, list) {
  const init = { status: from.status, headers: headersOf(list) };
  const ws = from.webSocket;
  if (ws) init.webSocket = ws;
  return new Response(from.body, init);
}
"#)]
    extern "C" {
        #[wasm_bindgen(js_name = requestHead)]
        fn request_head(r: &web_sys::Request) -> String;
        #[wasm_bindgen(js_name = responseHead)]
        fn response_head(r: &web_sys::Response) -> String;
        #[wasm_bindgen(js_name = fetchOrigin)]
        fn fetch_origin_js(
            packed: &str,
            body: &JsValue,
            manual: bool,
            ms: f64,
            key: &JsValue,
        ) -> Promise;
        #[wasm_bindgen(js_name = rateLimit)]
        fn rate_limit_js(env: &JsValue, name: &JsValue, key: &str) -> Promise;
        #[wasm_bindgen(js_name = rateLimits)]
        fn rate_limits_js(
            env: &JsValue,
            a: &JsValue,
            key_a: &str,
            b: &JsValue,
            key_b: &str,
        ) -> Promise;
        #[wasm_bindgen(js_name = respond, catch)]
        fn respond_js(from: &web_sys::Response, list: &str) -> Result<web_sys::Response, JsValue>;
    }

    impl Head {
        /// A request's method, URL and headers, in one crossing.
        pub fn of_request(req: &web_sys::Request) -> Self {
            Self::parse(request_head(req), true)
        }

        /// A response's status and headers, in one crossing.
        pub fn of_response(resp: &web_sys::Response) -> Self {
            Self::parse(response_head(resp), false)
        }
    }

    /// How a fetch to the origin ended.
    pub enum Fetched {
        /// The origin's response (its body still streaming).
        Response(web_sys::Response),
        /// No response headers within the timeout; the fetch was aborted.
        TimedOut,
        /// The fetch failed (connection refused, DNS, a bad URL): the runtime's message.
        Failed(String),
        /// The runtime could not sign the assertion (nothing was sent): its message.
        SignFailed(String),
    }

    /// An assertion for [`fetch_origin`] to sign as the request leaves: header `name`
    /// gets `input`, `.`, and the Ed25519 signature of `input` with `key`, base64url.
    pub struct SignOnTheWay<'a> {
        /// The WebCrypto `CryptoKey`.
        pub key: &'a JsValue,
        /// The JWT signing input.
        pub input: &'a str,
        /// The header it goes in.
        pub name: &'a str,
    }

    /// Fetches `url` with `method`, the headers of `list` ([`super::push`]) and `body`
    /// (`JsValue::NULL` for none), redirects left to the client when `manual`, aborted
    /// when no response headers arrive within `timeout_ms`; with `sign`, the assertion is
    /// signed and added first. One promise, awaited once.
    pub async fn fetch_origin(
        url: &str,
        method: &str,
        list: &str,
        body: &JsValue,
        manual: bool,
        timeout_ms: u64,
        sign: Option<SignOnTheWay<'_>>,
    ) -> Fetched {
        // One string out: method, URL, the headers, and the assertion to sign last.
        let mut packed = String::with_capacity(method.len() + url.len() + list.len() + 512);
        packed.push_str(method);
        packed.push(super::SEP);
        packed.push_str(url);
        if !list.is_empty() {
            packed.push(super::SEP);
            packed.push_str(list);
        }
        let key = match &sign {
            Some(s) => {
                packed.push(super::SEP);
                packed.push_str(s.name);
                packed.push(super::SEP);
                packed.push_str(s.input);
                s.key
            }
            None => &JsValue::UNDEFINED,
        };
        let promise = fetch_origin_js(&packed, body, manual, timeout_ms as f64, key);
        match JsFuture::from(promise).await {
            Ok(v) if v.is_null() => Fetched::TimedOut,
            Ok(v) => match v.as_string() {
                Some(e) => Fetched::SignFailed(e),
                None => Fetched::Response(v.unchecked_into()),
            },
            Err(e) => Fetched::Failed(message(&e)),
        }
    }

    /// What a rate-limiting binding said about one request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Limit {
        /// Under the limit.
        Allowed,
        /// Over it.
        Limited,
        /// No binding of that name.
        NoBinding,
    }

    /// One limiter's answer as the JS gives it: 1, 0, 2, or what the binding threw.
    fn limit_of(v: &JsValue) -> Result<Limit, String> {
        match v.as_f64() {
            Some(1.0) => Ok(Limit::Allowed),
            Some(0.0) => Ok(Limit::Limited),
            Some(2.0) => Ok(Limit::NoBinding),
            _ => Err(message(v)),
        }
    }

    thread_local! {
        // Binding names as JS strings, made once per isolate instead of copied across on
        // every request.
        static NAMES: std::cell::RefCell<Vec<(&'static str, JsValue)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    fn js_name(name: &'static str) -> JsValue {
        NAMES.with(|names| {
            let mut names = names.borrow_mut();
            if let Some((_, v)) = names.iter().find(|(n, _)| *n == name) {
                return v.clone();
            }
            let v = JsValue::from_str(name);
            names.push((name, v.clone()));
            v
        })
    }

    /// Calls binding `name`'s `limit({key})` (one promise); `Err` is the binding's failure.
    pub async fn rate_limit(
        env: &worker::Env,
        name: &'static str,
        key: &str,
    ) -> Result<Limit, String> {
        let env: &JsValue = env.as_ref();
        match JsFuture::from(rate_limit_js(env, &js_name(name), key)).await {
            Ok(v) => limit_of(&v),
            Err(e) => Err(message(&e)),
        }
    }

    /// Two limiters counted together: both calls made at once, one promise awaited.
    pub async fn rate_limits(
        env: &worker::Env,
        (a, key_a): (&'static str, &str),
        (b, key_b): (&'static str, &str),
    ) -> [Result<Limit, String>; 2] {
        let env: &JsValue = env.as_ref();
        let promise = rate_limits_js(env, &js_name(a), key_a, &js_name(b), key_b);
        match JsFuture::from(promise).await {
            Ok(v) => {
                let pair: &worker::js_sys::Array = v.unchecked_ref();
                [limit_of(&pair.get(0)), limit_of(&pair.get(1))]
            }
            Err(e) => {
                let e = message(&e);
                [Err(e.clone()), Err(e)]
            }
        }
    }

    /// A new response around `from`'s status, body stream and WebSocket, with exactly
    /// the headers of `list`.
    pub fn respond(from: &web_sys::Response, list: &str) -> Result<web_sys::Response, String> {
        respond_js(from, list).map_err(|e| message(&e))
    }

    /// The message of a thrown JS value.
    pub fn message(e: &JsValue) -> String {
        match e.dyn_ref::<worker::js_sys::Error>() {
            Some(err) => String::from(err.message()),
            None => e.as_string().unwrap_or_else(|| format!("{e:?}")),
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{
    fetch_origin, message, rate_limit, rate_limits, respond, Fetched, Limit, SignOnTheWay,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_parses_into_method_url_and_headers() {
        let h = Head::parse(
            "POST\nhttp://e/graphql?x=1\nauthorization\nBearer t\ncontent-type\napplication/json"
                .to_owned(),
            true,
        );
        assert_eq!(h.first(), "POST");
        assert_eq!(h.url(), "http://e/graphql?x=1");
        assert_eq!(h.get("authorization"), Some("Bearer t"));
        assert_eq!(h.get("content-type"), Some("application/json"));
        assert_eq!(h.get("cookie"), None);
        assert_eq!(h.headers().count(), 2);
        let bare = Head::parse("GET\nhttp://e/".to_owned(), true);
        assert_eq!(bare.headers().count(), 0);
        assert_eq!(bare.url(), "http://e/");
    }

    #[test]
    fn a_response_head_parses_into_status_and_headers_with_empty_values_kept() {
        let h = Head::parse(
            "204\nx-empty\n\nset-cookie\na=1\nset-cookie\nb=2".to_owned(),
            false,
        );
        assert_eq!(h.status(), 204);
        assert_eq!(h.url(), "");
        assert_eq!(h.get("x-empty"), Some(""));
        let cookies: Vec<_> = h.headers().filter(|(n, _)| *n == "set-cookie").collect();
        assert_eq!(cookies, [("set-cookie", "a=1"), ("set-cookie", "b=2")]);
        assert_eq!(Head::parse(String::new(), false).status(), 0);
        // A trailing name without a value is left out.
        assert_eq!(
            Head::parse("200\nx-a\n1\nx-b".to_owned(), false)
                .headers()
                .count(),
            1
        );
    }

    #[test]
    fn a_list_round_trips_and_refuses_what_headers_would() {
        let mut list = String::new();
        push(&mut list, "x-request-id", "r1");
        push(&mut list, "x-evil", "a\r\nset-cookie: b");
        push(&mut list, "", "v");
        push(&mut list, "vary", "");
        push(&mut list, "vary2", "Origin");
        assert_eq!(list, "x-request-id\nr1\nvary\n\nvary2\nOrigin");
        let back = Head::parse(format!("200\n{list}"), false);
        assert_eq!(
            back.headers().collect::<Vec<_>>(),
            [("x-request-id", "r1"), ("vary", ""), ("vary2", "Origin")]
        );
    }

    #[test]
    fn a_request_url_splits_as_the_url_parser_parses_it() {
        for raw in [
            "http://e/graphql?x=1",
            "https://edge.example.com/",
            "http://e",
            "http://e?q",
            "http://e/?",
            "http://127.0.0.1:8787/api/v1/events/c-1?ticket=t&x=%20y",
            "http://e/a/b%2Fc?x=1?y=2#frag",
            "http://e/a#f?not-a-query",
            "http://user:pw@e:81/p;x?y",
            "http://[::1]:8080/p/",
        ] {
            // What the runtime hands over is the parser's own serialisation.
            let parsed = url::Url::parse(raw).unwrap();
            let serialised = parsed.as_str();
            let split = RequestUrl::split(serialised).unwrap();
            assert_eq!(split.path(), parsed.path(), "{serialised}");
            assert_eq!(split.query(), parsed.query(), "{serialised}");
        }
        assert!(RequestUrl::split("/relative?x").is_err());
    }
}
