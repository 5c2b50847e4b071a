//! A pingora 0.9 HTTP server for baton's benchmark (scripts/bench/run.sh).
//!
//! Every request gets `200 hello from pingora pid N`. The address comes from
//! `BENCH_LISTEN` (pingora parses the command line itself: `-c conf.yaml`,
//! `-u` to take the listening sockets from the running process over its
//! `upgrade_sock`; the old process is then sent SIGQUIT).

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::prelude::Opt;
use pingora::protocols::http::ServerSession;
use pingora::server::Server;
use pingora::services::listening::Service;

struct Hello {
    body: Vec<u8>,
}

#[async_trait]
impl ServeHttp for Hello {
    async fn response(&self, _session: &mut ServerSession) -> Response<Vec<u8>> {
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .header(http::header::CONTENT_LENGTH, self.body.len())
            .body(self.body.clone())
            .expect("static response")
    }
}

fn main() {
    let addr = std::env::var("BENCH_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let opt = Opt::parse_args();
    let mut server = Server::new(Some(opt)).expect("pingora server");
    server.bootstrap();
    let body = format!("hello from pingora pid {}\n", std::process::id()).into_bytes();
    let mut svc = Service::new("hello".to_owned(), Hello { body });
    svc.add_tcp(&addr);
    server.add_service(svc);
    server.run_forever();
}
