//! The frames stream's single-message reads: "the first message of this subject from
//! sequence s", the read every subscription's start point and catch-up is made of, and
//! "the message at sequence s, if it is on this subject", for a resume whose one new frame
//! the router's index names (`router`'s `Seen`; NATS finds the first of a subject from a
//! sequence by scanning the messages after it in their block, this one by its index).
//!
//! A **direct get** (`$JS.API.DIRECT.GET.<stream>`, the stream allowing it) is what KV
//! reads use: the stream's own subscription answers it, with the message as headers and
//! raw payload. The leader's `STREAM.MSG.GET` goes through the JetStream API's routing and
//! answers in JSON with the payload in base64: during 10k SSE opens its handler alone was
//! 15 % of nats-server's CPU (docs/BENCHMARKS.md, "Seventh session").
//!
//! A direct get may be answered by any replica of the stream (and by a mirror made with
//! `mirror_direct`), and a follower may not have applied the newest writes yet. The
//! subscription protocol needs read-after-write: a frame the router handled before a
//! subscription registered must be found by its reads (`mod.rs`, "subscribe"). NATS 2.15
//! has no way to ask for it on a direct get (ADR-53's `min_last_seq` is not in it: the
//! leader's `STREAM.MSG.GET` refuses the field, direct gets ignore it). So direct gets
//! are used only while the stream has one replica — its one server then answers every
//! read — and a replicated stream is read through its leader, as every read was before.
//! The replica count is learnt from every stream info the bus fetches (at open, when the
//! router's consumer starts, on a resume's and a catch-up's checks) and after
//! `NATS_REPLICAS` is applied ([`super::NatsBus::recheck_stream`]).

use super::super::BusError;
use super::unavailable;
use super::OPERATION_TIMEOUT;
use async_nats::jetstream::stream::{self as js, RawMessageErrorKind};
use async_nats::{Client, HeaderMap, RequestErrorKind, StatusCode};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};

/// One message read from the stream.
#[derive(Debug)]
pub(super) struct Read {
    /// Its stream sequence.
    pub(super) sequence: u64,
    /// Its headers as published (a direct get adds NATS's own `Nats-*` ones).
    pub(super) headers: HeaderMap,
    /// Its data as published.
    pub(super) payload: Bytes,
}

/// The stream's reads, shared by every subscription of one bus.
pub(super) struct Reader {
    /// The stream's handle: `STREAM.INFO` and `STREAM.MSG.GET`. Its JetStream context is
    /// ~250 bytes, which per idle subscription would be a tenth of its memory: held once.
    pub(super) stream: js::Stream<()>,
    client: Client,
    /// `$JS.API.DIRECT.GET.<stream>`.
    direct_subject: String,
    /// The stream allows direct gets and only its one server can answer them.
    direct: AtomicBool,
    /// Set once a direct get was handed to the leader, so the log says it once.
    told_leader: AtomicBool,
}

/// What [`Reader::at`] found at a sequence.
#[derive(Debug)]
pub(super) enum At {
    /// The message, on the subject asked about.
    Found(Read),
    /// A message on another subject.
    Other,
    /// No message: it left the stream (or was never stored).
    Gone,
}

/// True if a direct get of the stream `config` describes sees every write acknowledged
/// before it: direct gets are allowed and the stream has one replica. (A mirror made with
/// `mirror_direct` would answer them too, and lag: docs/OPERATIONS.md says not to make
/// one of this stream.)
fn direct_is_current(config: &js::Config) -> bool {
    config.allow_direct && config.num_replicas <= 1
}

/// The request body of a direct get of the message at `seq`.
fn direct_request_at(seq: u64) -> Bytes {
    Bytes::from(format!("{{\"seq\":{seq}}}"))
}

/// The request body of a direct get of the first message of `subject` from `from`.
fn direct_request(subject: &str, from: u64) -> Bytes {
    #[derive(serde::Serialize)]
    struct Request<'a> {
        seq: u64,
        next_by_subj: &'a str,
    }
    let body = Request {
        seq: from,
        next_by_subj: subject,
    };
    Bytes::from(serde_json::to_vec(&body).expect("a direct get request is plain data"))
}

/// What a direct get's answer says.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Found(u64),
    NotFound,
    /// Another status: read again through the leader.
    AskLeader(String),
}

fn answer(status: Option<StatusCode>, description: Option<&str>, headers: &HeaderMap) -> Answer {
    match status {
        Some(StatusCode::NOT_FOUND) => Answer::NotFound,
        Some(s) if s != StatusCode::OK => {
            Answer::AskLeader(format!("{s} {}", description.unwrap_or_default()))
        }
        _ => match headers
            .get(async_nats::header::NATS_SEQUENCE)
            .and_then(|v| v.as_str().parse().ok())
        {
            Some(seq) => Answer::Found(seq),
            None => Answer::AskLeader("an answer without Nats-Sequence".to_owned()),
        },
    }
}

impl Reader {
    /// The reads of the stream `config` describes, through `stream`.
    pub(super) fn new(client: Client, stream: js::Stream<()>, config: &js::Config) -> Self {
        Self {
            stream,
            client,
            direct_subject: format!("$JS.API.DIRECT.GET.{}", config.name),
            direct: AtomicBool::new(direct_is_current(config)),
            told_leader: AtomicBool::new(false),
        }
    }

    /// Learns what the stream is now (its replicas may have changed).
    pub(super) fn note(&self, info: &js::Info) {
        self.direct
            .store(direct_is_current(&info.config), Ordering::Relaxed);
    }

    /// The first message of `subject` with sequence ≥ `from`, or `None`.
    pub(super) async fn first_from(
        &self,
        subject: &str,
        from: u64,
    ) -> Result<Option<Read>, BusError> {
        let from = from.max(1);
        if let Some(answer) = self
            .direct_get(direct_request(subject, from), subject, from)
            .await?
        {
            return Ok(answer);
        }
        self.leader_first_from(subject, from).await
    }

    /// The message at `seq`, if it is still in the stream: [`At::Other`] when it is on
    /// another subject than `subject`.
    pub(super) async fn at(&self, subject: &str, seq: u64) -> Result<At, BusError> {
        if let Some(answer) = self
            .direct_get(direct_request_at(seq), subject, seq)
            .await?
        {
            return Ok(match answer {
                None => At::Gone,
                Some(read)
                    if read
                        .headers
                        .get(async_nats::header::NATS_SUBJECT)
                        .is_some_and(|s| s.as_str() == subject) =>
                {
                    At::Found(read)
                }
                Some(_) => At::Other,
            });
        }
        match self.stream.get_raw_message(seq).await {
            Ok(m) if m.subject.as_str() == subject => Ok(At::Found(Read {
                sequence: m.sequence,
                headers: m.headers,
                payload: m.payload,
            })),
            Ok(_) => Ok(At::Other),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(At::Gone),
            Err(e) => Err(unavailable(format!("read {subject} at {seq}"), e)),
        }
    }

    /// A direct get of `body` (about `subject` at or from `seq`, for the log): `Some` with
    /// the answer when one was given, `None` when the leader must be asked instead (direct
    /// gets are not current for this stream, or nobody answered them).
    async fn direct_get(
        &self,
        body: Bytes,
        subject: &str,
        seq: u64,
    ) -> Result<Option<Option<Read>>, BusError> {
        if !self.direct.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let what = || format!("direct get of {subject} at or from {seq}");
        let request = async_nats::client::Request::new()
            .payload(body)
            .timeout(Some(OPERATION_TIMEOUT));
        let why = match self
            .client
            .send_request(self.direct_subject.clone(), request)
            .await
        {
            Ok(m) => {
                let headers = m.headers.unwrap_or_default();
                match answer(m.status, m.description.as_deref(), &headers) {
                    Answer::Found(sequence) => {
                        return Ok(Some(Some(Read {
                            sequence,
                            headers,
                            payload: m.payload,
                        })));
                    }
                    Answer::NotFound => return Ok(Some(None)),
                    Answer::AskLeader(why) => why,
                }
            }
            // Nobody serves direct gets (the setting was just changed): the leader does.
            Err(e) if e.kind() == RequestErrorKind::NoResponders => e.to_string(),
            Err(e) => return Err(unavailable(what(), e)),
        };
        if !self.told_leader.swap(true, Ordering::Relaxed) {
            tracing::warn!(subject, seq, %why, "direct get not answered; read through the stream leader (logged once)");
        }
        Ok(None)
    }

    /// [`Reader::first_from`] through the leader's `STREAM.MSG.GET`.
    async fn leader_first_from(&self, subject: &str, from: u64) -> Result<Option<Read>, BusError> {
        match self
            .stream
            .get_first_raw_message_by_subject(subject, from)
            .await
        {
            Ok(m) => Ok(Some(Read {
                sequence: m.sequence,
                headers: m.headers,
                payload: m.payload,
            })),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(format!("read {subject} from {from}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stream_with_one_replica_that_allows_them_is_read_directly() {
        let config = |allow_direct, num_replicas| js::Config {
            allow_direct,
            num_replicas,
            ..Default::default()
        };
        assert!(direct_is_current(&config(true, 1)));
        // Older servers report an unset replica count as 0: one replica.
        assert!(direct_is_current(&config(true, 0)));
        assert!(!direct_is_current(&config(true, 3)), "followers may lag");
        assert!(!direct_is_current(&config(false, 1)), "nobody answers");
    }

    #[test]
    fn a_read_at_a_sequence_names_only_the_sequence() {
        let v: serde_json::Value = serde_json::from_slice(&direct_request_at(42)).unwrap();
        assert_eq!(v, serde_json::json!({"seq": 42}));
    }

    #[test]
    fn the_request_names_the_subject_and_the_start() {
        let body = direct_request("gateway.clients.a", 7);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"seq": 7, "next_by_subj": "gateway.clients.a"})
        );
    }

    #[test]
    fn an_answer_is_a_message_nothing_or_a_question_for_the_leader() {
        let mut found = HeaderMap::new();
        found.insert(async_nats::header::NATS_SEQUENCE, "12");
        assert_eq!(answer(None, None, &found), Answer::Found(12));
        assert_eq!(
            answer(
                Some(StatusCode::NOT_FOUND),
                Some("Message Not Found"),
                &HeaderMap::new()
            ),
            Answer::NotFound
        );
        let behind = StatusCode::from_u16(412).unwrap();
        assert!(matches!(
            answer(Some(behind), Some("Min Last Sequence"), &HeaderMap::new()),
            Answer::AskLeader(why) if why.contains("Min Last Sequence")
        ));
        assert!(matches!(
            answer(None, None, &HeaderMap::new()),
            Answer::AskLeader(_)
        ));
    }
}
