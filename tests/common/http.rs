//! A small HTTP/1.1 file server on 127.0.0.1 for the download tests: each route can honour or
//! ignore `Range` (with `If-Range`), leave out `Content-Length`, drop the connection mid-body,
//! or dribble the body slowly. Every request is logged.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Route {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_length: bool,
    pub ranges: bool,
    pub etag: Option<String>,
    /// Drop the connection after this many body bytes, for the first `drops` requests.
    pub drop_after: usize,
    pub drops: usize,
    /// Send the body in chunks of this many bytes with this pause before each.
    pub pace: Option<(usize, Duration)>,
    /// A `Location:` header (for redirects).
    pub location: Option<String>,
}

impl Route {
    /// A file served well: Content-Length, Range honoured, a strong ETag.
    pub fn file(body: Vec<u8>) -> Self {
        let etag = format!(
            "\"{:x}-{}\"",
            body.len(),
            body.iter().map(|&b| b as u64).sum::<u64>()
        );
        Route {
            status: 200,
            body,
            content_length: true,
            ranges: true,
            etag: Some(etag),
            drop_after: 0,
            drops: 0,
            pace: None,
            location: None,
        }
    }

    /// `302 Found` to `location`.
    pub fn redirect(location: &str) -> Self {
        Route {
            status: 302,
            location: Some(location.into()),
            ..Route::file(Vec::new())
        }
    }

    pub fn not_found() -> Self {
        Route {
            status: 404,
            ..Route::file(Vec::new())
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Served {
    /// `GET` or `HEAD`.
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub status: u16,
    /// Body bytes the server meant to send (before any drop); read only through `Debug`, in
    /// failure messages that print the log.
    #[allow(dead_code)]
    pub planned: usize,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    log: Vec<Served>,
    served: HashMap<String, usize>,
}

pub struct HttpServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl HttpServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = Arc::clone(&shared);
                thread::spawn(move || handle(stream, &shared));
            }
        });
        HttpServer { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn route(&self, path: &str, route: Route) {
        self.state.lock().unwrap().routes.insert(path.into(), route);
    }

    pub fn requests(&self, path: &str) -> Vec<Served> {
        let state = self.state.lock().unwrap();
        state
            .log
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

fn handle(mut stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let method = request_line
        .split_whitespace()
        .next()
        .unwrap_or("GET")
        .to_string();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    let if_range = headers.get("if-range").cloned();
    let (route, drop_now) = {
        let mut state = state.lock().unwrap();
        let route = state
            .routes
            .get(&path)
            .cloned()
            .unwrap_or_else(Route::not_found);
        let served = state.served.entry(path.clone()).or_insert(0);
        let drop_now = *served < route.drops;
        *served += 1;
        (route, drop_now)
    };
    let len = route.body.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|_| route.ranges)
        .filter(|_| if_range.is_none() || if_range == route.etag);
    let mut head = String::new();
    let (status, body) = if route.status != 200 {
        head.push_str(&format!(
            "HTTP/1.1 {} Not Found\r\nContent-Length: 0\r\n",
            route.status
        ));
        if let Some(location) = &route.location {
            head.push_str(&format!("Location: {location}\r\n"));
        }
        (route.status, &route.body[..0])
    } else if let Some(start) = start {
        if start >= len {
            head.push_str(&format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n"));
            (416, &route.body[..0])
        } else {
            head.push_str(&format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\n",
                len - 1
            ));
            (206, &route.body[start..])
        }
    } else {
        head.push_str("HTTP/1.1 200 OK\r\n");
        (200, &route.body[..])
    };
    if status == 200 || status == 206 {
        if route.content_length {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if let Some(etag) = &route.etag {
            head.push_str(&format!("ETag: {etag}\r\n"));
        }
        if route.ranges {
            head.push_str("Accept-Ranges: bytes\r\n");
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    // A HEAD response carries the headers of a GET and no body.
    let body = if method == "HEAD" { &body[..0] } else { body };
    state.lock().unwrap().log.push(Served {
        method,
        path,
        range,
        if_range,
        status,
        planned: body.len(),
    });
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let body = if drop_now {
        &body[..route.drop_after.min(body.len())]
    } else {
        body
    };
    match route.pace {
        None => {
            let _ = stream.write_all(body);
        }
        Some((chunk, pause)) => {
            for piece in body.chunks(chunk) {
                thread::sleep(pause);
                if stream.write_all(piece).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

/// Serve `kernel`'s NVIDIA overlay archive (tar.zst, manifest last) at `/{kernel}.tar.zst`,
/// `shape` adjusting the route (pacing; it gets the archive's length), and make that URL
/// pattern `host`'s one stage source (plain HTTP allowed), `extra_stage` appended to `[stage]`.
pub fn serve_overlay_source(
    host: &super::host::FakeHost,
    server: &HttpServer,
    kernel: &str,
    shape: impl FnOnce(&mut Route, usize),
    extra_stage: &str,
) {
    let (archive, _) = super::archive::overlay_archive(
        &super::overlay::OverlayBuilder::nvidia(kernel),
        super::archive::Compression::Zstd,
        super::archive::ManifestAt::Last,
    );
    let length = archive.len();
    let mut route = Route::file(archive);
    shape(&mut route, length);
    server.route(&format!("/{kernel}.tar.zst"), route);
    host.write(
        "/etc/nvdriver-agent/config.toml",
        &format!(
            "[driver]\nversion = \"{}\"\n[stage]\nsources = [\"{}\"]\nallow-http = true\n{extra_stage}",
            super::overlay::DRIVER,
            server.url("/{kernel}.tar.zst")
        ),
    );
}
