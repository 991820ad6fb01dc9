//! A lean `/events` client for load generation: one raw TCP socket, an HTTP/1.1 request
//! written by hand, chunked decoding, and frames parsed by the harness's
//! [`parse_frame`] (so the wire reading is the one the end-to-end tests trust).
//!
//! Why not reqwest: a load generator holds ~10k of these per process, and must choose
//! each socket's source address (127.0.0.2, 127.0.0.3, … — bind before connect, with
//! `IP_BIND_ADDRESS_NO_PORT`) so that tens of thousands of loopback connections do not
//! run out of ephemeral ports. A raw socket gives both, at ~1 KiB per idle connection.
//!
//! Everything read from the server is bounded: the response head (16 KiB), a chunk-size
//! line (32 bytes) and a pending frame (1 MiB); past a bound the connection fails instead
//! of growing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub use crate::harness::sse::{parse_frame, SseFrame};

const MAX_HEAD: usize = 16 * 1024;
const MAX_SIZE_LINE: usize = 32;
const MAX_PENDING_FRAME: usize = 1024 * 1024;
const READ_CHUNK: usize = 4096;

/// Where and how to open a stream.
#[derive(Debug, Clone)]
pub struct SseTarget {
    /// The origin's (or peer's) public listener.
    pub addr: SocketAddr,
    /// Path and query, e.g. `/events`.
    pub path: String,
    /// Session token sent as `Authorization: Bearer` (never logged).
    pub token: Option<String>,
}

impl SseTarget {
    fn request(&self) -> String {
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
            self.path, self.addr
        );
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        req
    }
}

/// The source address for the `i`-th connection of a generator that spreads
/// `per_address` connections over each of 127.0.0.`first`, 127.0.0.`first+1`, …
pub fn source_address(first: u8, per_address: usize, i: usize) -> Ipv4Addr {
    let offset = (i / per_address.max(1)).min(usize::from(u8::MAX - first));
    Ipv4Addr::new(127, 0, 0, first + offset as u8)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux ≥ 4.2): `bind` then only fixes the source
/// address and `connect` chooses the port. std and tokio do not expose the option, so
/// it is one `setsockopt` call through the C library std already links.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::raw::{c_int, c_void};
    extern "C" {
        fn setsockopt(
            fd: c_int,
            level: c_int,
            name: c_int,
            value: *const c_void,
            len: u32,
        ) -> c_int;
    }
    const IPPROTO_IP: c_int = 0;
    const IP_BIND_ADDRESS_NO_PORT: c_int = 24;
    let one: c_int = 1;
    // SAFETY: the fd is open (owned by `socket` for the whole call), and the value
    // pointer and length describe one live c_int, as setsockopt(2) requires.
    let rc = unsafe {
        setsockopt(
            socket.as_raw_fd(),
            IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            (&one as *const c_int).cast(),
            std::mem::size_of::<c_int>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Chunked transfer decoding, fed bytes as they arrive.
#[derive(Debug)]
enum Chunked {
    /// Reading a chunk-size line (hex, optional `;ext`, CRLF).
    Size(Vec<u8>),
    /// This many data bytes of the current chunk are still to come.
    Data(usize),
    /// The CRLF after a chunk's data: this many bytes of it still to skip.
    DataEnd(u8),
    /// The last chunk was read: the body is over.
    Done,
}

#[derive(Debug)]
enum BodyCoding {
    Chunked(Chunked),
    /// Read to end of stream.
    Identity,
}

impl BodyCoding {
    /// Decodes `input`, appending body bytes to `out`. Errors on a malformed framing.
    fn decode(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
        let BodyCoding::Chunked(state) = self else {
            out.extend_from_slice(input);
            return Ok(());
        };
        while !input.is_empty() {
            match state {
                Chunked::Size(line) => {
                    let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                        line.extend_from_slice(input);
                        if line.len() > MAX_SIZE_LINE {
                            bail!("chunk-size line too long");
                        }
                        return Ok(());
                    };
                    line.extend_from_slice(&input[..nl]);
                    input = &input[nl + 1..];
                    let text = std::str::from_utf8(line).context("chunk size is not text")?;
                    let hex = text.trim_end_matches('\r').split(';').next().unwrap_or("");
                    let size = usize::from_str_radix(hex.trim(), 16)
                        .with_context(|| format!("bad chunk size {hex:?}"))?;
                    *state = if size == 0 {
                        Chunked::Done
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        *state = Chunked::DataEnd(2);
                    }
                }
                Chunked::DataEnd(left) => {
                    let n = usize::from(*left).min(input.len());
                    input = &input[n..];
                    *left -= n as u8;
                    if *left == 0 {
                        *state = Chunked::Size(Vec::new());
                    }
                }
                Chunked::Done => return Ok(()),
            }
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        matches!(self, BodyCoding::Chunked(Chunked::Done))
    }
}

/// An open `/events` stream.
pub struct SseConn {
    stream: TcpStream,
    coding: BodyCoding,
    /// Decoded body bytes not yet split into frames.
    pending: Vec<u8>,
}

/// Splits the first complete frame block (up to a blank line) off `pending`.
fn take_block(pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let pos = pending.windows(2).position(|w| w == b"\n\n")?;
    let rest = pending.split_off(pos + 2);
    Some(std::mem::replace(pending, rest))
}

fn head_status(head: &str) -> anyhow::Result<u16> {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {:?}", head.lines().next()))
}

impl SseConn {
    /// Connects (from `source` if given), sends the request and reads the response head.
    /// A non-200 answer is an error carrying the status and the start of the body.
    pub async fn open(
        target: &SseTarget,
        source: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        tokio::time::timeout(timeout, Self::open_inner(target, source))
            .await
            .with_context(|| format!("/events not open within {timeout:?}"))?
    }

    async fn open_inner(target: &SseTarget, source: Option<Ipv4Addr>) -> anyhow::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            // The port is picked at connect time from the whole 4-tuple: cheaper than
            // bind's search for a port free on every destination, which grows with the
            // thousands of ports one source address already holds.
            bind_address_no_port(&socket)?;
            socket
                .bind(SocketAddr::new(IpAddr::V4(ip), 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        let mut stream = socket
            .connect(target.addr)
            .await
            .with_context(|| format!("connect {}", target.addr))?;
        stream.set_nodelay(true)?;
        stream.write_all(target.request().as_bytes()).await?;

        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; READ_CHUNK];
        let body_start = loop {
            if let Some(pos) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            if head.len() > MAX_HEAD {
                bail!("response head over {MAX_HEAD} bytes");
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                bail!("connection closed before the response head");
            }
            head.extend_from_slice(&buf[..n]);
        };
        let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
        let status = head_status(&text)?;
        let chunked = text
            .lines()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        let mut coding = if chunked {
            BodyCoding::Chunked(Chunked::Size(Vec::new()))
        } else {
            BodyCoding::Identity
        };
        let mut pending = Vec::new();
        coding.decode(&head[body_start..], &mut pending)?;
        if status != 200 {
            let body = String::from_utf8_lossy(&pending);
            bail!(
                "/events answered {status}: {}",
                body.chars().take(200).collect::<String>()
            );
        }
        Ok(Self {
            stream,
            coding,
            pending,
        })
    }

    /// The next frame (comment-only blocks skipped); `Ok(None)` at the end of the stream.
    pub async fn next_frame(&mut self) -> anyhow::Result<Option<SseFrame>> {
        let mut buf = [0u8; READ_CHUNK];
        loop {
            while let Some(block) = take_block(&mut self.pending) {
                if let Some(frame) = parse_frame(&String::from_utf8_lossy(&block)) {
                    return Ok(Some(frame));
                }
            }
            if self.coding.is_done() {
                return Ok(None);
            }
            if self.pending.len() > MAX_PENDING_FRAME {
                bail!("a frame over {MAX_PENDING_FRAME} bytes");
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.coding.decode(&buf[..n], &mut self.pending)?;
        }
    }

    /// The next frame within `timeout`; an error if none came.
    pub async fn next_frame_within(&mut self, timeout: Duration) -> anyhow::Result<SseFrame> {
        match tokio::time::timeout(timeout, self.next_frame()).await {
            Ok(Ok(Some(f))) => Ok(f),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("no frame within {timeout:?}"),
        }
    }

    /// Reads the init frame and returns the client id it assigns.
    pub async fn read_init(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let init = self.next_frame_within(timeout).await?;
        if init.event != "message" {
            bail!("first frame is {:?}, not the init message", init.event);
        }
        init.data["result"]["clientId"]
            .as_str()
            .map(str::to_owned)
            .context("init frame without result.clientId")
    }

    /// Idles: reads and discards whatever comes (keep-alives, pings) so the server's
    /// writes never block, until the stream ends. Holds a small buffer only while reading.
    pub async fn idle(self) {
        let SseConn { mut stream, .. } = self;
        let mut buf = [0u8; 256];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(parts: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut c = BodyCoding::Chunked(Chunked::Size(Vec::new()));
        let mut out = Vec::new();
        for p in parts {
            c.decode(p, &mut out).expect("valid chunked input");
        }
        (out, c.is_done())
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let (out, done) = decode_all(&[&wire[..split], &wire[split..]]);
            assert_eq!(out, b"hello, world", "split at {split}");
            assert!(done);
        }
        let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&bytewise).0, b"hello, world");
    }

    #[test]
    fn malformed_chunk_sizes_are_refused() {
        let mut c = BodyCoding::Chunked(Chunked::Size(Vec::new()));
        assert!(c.decode(b"zz\r\n", &mut Vec::new()).is_err());
        let mut c = BodyCoding::Chunked(Chunked::Size(Vec::new()));
        assert!(c.decode(&[b'1'; 40], &mut Vec::new()).is_err());
    }

    #[test]
    fn blocks_split_at_blank_lines() {
        let mut p = b"id: 1\nevent: a\ndata: {}\n\n:\n\nevent: b".to_vec();
        let first = take_block(&mut p).expect("one block");
        assert_eq!(
            parse_frame(&String::from_utf8_lossy(&first)).map(|f| f.event),
            Some("a".to_owned())
        );
        let second = take_block(&mut p).expect("comment block");
        assert!(parse_frame(&String::from_utf8_lossy(&second)).is_none());
        assert!(take_block(&mut p).is_none());
        assert_eq!(p, b"event: b");
    }

    #[test]
    fn source_addresses_spread_and_saturate() {
        assert_eq!(source_address(2, 1000, 0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_address(2, 1000, 2500), Ipv4Addr::new(127, 0, 0, 4));
        assert_eq!(
            source_address(250, 1, 100),
            Ipv4Addr::new(127, 0, 0, 255),
            "never wraps past 255"
        );
    }
}
