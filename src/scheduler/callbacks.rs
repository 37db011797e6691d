//! The callback outbox: POSTs an execution's JSON to its task's `callback_url` once it is
//! final. Rows live in the store, so a restart resumes where it stopped; failures back off
//! exponentially up to `callbacks.max_attempts`. Where callbacks may go is decided twice: on the
//! URL at intake ([`check_url`]) and on every address a host name resolves to at delivery (the
//! agent's resolver), so a name that resolves to loopback or a metadata address is refused
//! too. Redirects are never followed.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::{Core, LOG};
use crate::now_ms;

/// One entry of `callbacks.allowed_hosts`: a host name, an IP address or a CIDR range.
#[derive(Debug, Clone, PartialEq)]
pub enum HostRule {
    Name(String),
    Net(ipnet::IpNet),
}

/// An `allowed_hosts` entry that is neither a name, an address nor a CIDR range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadHostRule(pub String);

/// A `callback_url` the intake refuses; the message says what is wrong and how to allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RefusedUrl(pub String);

impl HostRule {
    /// # Errors
    /// An empty entry, or one with a `/` that is not a CIDR range.
    pub fn parse(s: &str) -> Result<HostRule, BadHostRule> {
        Self::parse_entry(s).map_err(BadHostRule)
    }

    fn parse_entry(s: &str) -> Result<HostRule, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty entry".into());
        }
        if let Ok(ip) = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(HostRule::Net(ipnet::IpNet::from(ip)));
        }
        if s.contains('/') {
            return s
                .parse::<ipnet::IpNet>()
                .map(HostRule::Net)
                .map_err(|e| format!("{s:?} is not a CIDR range: {e}"));
        }
        Ok(HostRule::Name(s.to_ascii_lowercase()))
    }
}

/// Where callbacks may go (`callbacks.allowed_hosts`).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<HostRule>,
}

/// Addresses no callback reaches unless listed: this host (loopback, unspecified), link-local
/// (169.254.0.0/16 holds the cloud metadata service; fe80::/10) and multicast.
/// An IPv6 address that carries an IPv4 one is judged by that one too: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`),
/// 6to4 (`2002:AABB:CCDD::/48`) and Teredo (`2001:0::/32`, client address inverted in the last
/// 32 bits): on a network that routes them, `[64:ff9b::169.254.169.254]` reaches the metadata
/// service (it was accepted).
fn embedded_v4(v: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v.segments();
    let low = |a: u16, b: u16| std::net::Ipv4Addr::from((u32::from(a) << 16) | u32::from(b));
    if let Some(m) = v.to_ipv4_mapped() {
        return Some(m);
    }
    match s {
        [0, 0, 0, 0, 0, 0, a, b] if (a, b) != (0, 0) && (a, b) != (0, 1) => Some(low(a, b)),
        [0x64, 0xff9b, 0, 0, 0, 0, a, b] => Some(low(a, b)),
        [0x64, 0xff9b, 1, ..] => Some(low(s[6], s[7])),
        [0x2002, a, b, ..] => Some(low(a, b)),
        [0x2001, 0, ..] => Some(low(!s[6], !s[7])),
        _ => None,
    }
}

fn is_internal(ip: IpAddr) -> bool {
    if let IpAddr::V6(v6) = ip {
        if embedded_v4(v6).is_some_and(|v4| is_internal(IpAddr::V4(v4))) {
            return true;
        }
    }
    match ip {
        IpAddr::V4(v) => {
            v.is_loopback()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_multicast()
                || v.is_broadcast()
        }
        IpAddr::V6(v) => {
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (v.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

impl Policy {
    /// # Errors
    /// An entry that [`HostRule::parse`] refuses.
    pub fn new(entries: &[String]) -> Result<Policy, BadHostRule> {
        let rules = entries
            .iter()
            .map(|e| HostRule::parse(e))
            .collect::<Result<_, _>>()?;
        Ok(Policy { rules })
    }

    fn listed_name(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.rules
            .iter()
            .any(|r| matches!(r, HostRule::Name(n) if *n == host))
    }

    fn listed_ip(&self, ip: IpAddr) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r, HostRule::Net(n) if n.contains(&ip)))
    }

    /// May a callback connect to `ip`, reached through the host name `host`?
    fn allows(&self, host: &str, ip: IpAddr) -> bool {
        if self.rules.is_empty() {
            return !is_internal(ip);
        }
        self.listed_ip(ip)
            || (self.listed_name(host) && !is_internal(ip))
            || (self.listed_name(host) && self.listed_ip(ip))
    }

    /// Checks a `callback_url` at intake: an `http://` URL whose host may be called. Names are
    /// checked again, resolved, at delivery.
    ///
    /// # Errors
    /// A message that says what is wrong and how to allow it.
    pub fn check_url(&self, raw: &str) -> Result<(), RefusedUrl> {
        self.check(raw).map_err(RefusedUrl)
    }

    fn check(&self, raw: &str) -> Result<(), String> {
        let u =
            url::Url::parse(raw).map_err(|e| format!("callback_url {raw:?} is not a URL: {e}"))?;
        match u.scheme() {
            "http" | "https" => {}
            s => {
                return Err(format!(
                    "callback_url must be an http:// or https:// URL, not {s}://"
                ))
            }
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("callback_url must not carry credentials".into());
        }
        let host = u.host().ok_or("callback_url has no host")?;
        let ok = match host {
            url::Host::Ipv4(ip) => self.allows("", IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => self.allows("", IpAddr::V6(ip)),
            url::Host::Domain(d) => {
                self.rules.is_empty() && d != "localhost" && !d.ends_with(".localhost")
                    || self.listed_name(d)
            }
        };
        if ok {
            Ok(())
        } else if self.rules.is_empty() {
            Err(format!(
                "callback_url host {host} is an internal address (loopback, link-local or \
                 metadata); list it in callbacks.allowed_hosts to allow it"
            ))
        } else {
            Err(format!(
                "callback_url host {host} is not in callbacks.allowed_hosts"
            ))
        }
    }
}

/// Resolves callback hosts and keeps only the addresses the policy allows, so a name that
/// resolves to an internal address is refused at connect time, not only at intake.
struct Resolver(Arc<Policy>);

impl ureq::Resolver for Resolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        let host = netloc.rsplit_once(':').map_or(netloc, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let all: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        let ok: Vec<SocketAddr> = all
            .iter()
            .copied()
            .filter(|a| self.0.allows(host, a.ip()))
            .collect();
        if ok.is_empty() && !all.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{host} resolves only to addresses callbacks may not reach ({}); see callbacks.allowed_hosts", all[0].ip()),
            ));
        }
        Ok(ok)
    }
}

pub(super) fn run(core: &Core, wake: &Receiver<()>) {
    let cfg = core.cfg.callbacks.clone();
    // Config validation parsed the same entries; an error here cannot happen after it.
    let policy = Arc::new(Policy::new(&cfg.allowed_hosts).unwrap_or_default());
    // https:// targets: the web PKI roots, or callbacks.ca (checked at config validation).
    let mut builder = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(cfg.timeout_ms.max(100)))
        .redirects(0)
        .resolver(Resolver(policy));
    match crate::trust::tls::client_config(&cfg.ca, "", "", "callbacks.ca") {
        Ok(tls) => builder = builder.tls_config(tls),
        Err(e) => log::error!(target: LOG, "{e}: https:// callbacks will fail"),
    }
    let agent = builder.build();
    while !core.stopping() {
        let now = now_ms();
        let due = match core.store.outbox_due(now, 32) {
            Ok(d) => d,
            Err(e) => {
                log::warn!(target: LOG, "cannot read the callback outbox: {e}");
                Vec::new()
            }
        };
        for row in &due {
            if core.stopping() {
                return;
            }
            let body = match core.store.get_execution(row.execution_id) {
                Ok(Some(e)) => e.to_json(),
                Ok(None) => {
                    let _ = core.store.outbox_result(
                        row.id,
                        false,
                        Some("execution no longer exists"),
                        None,
                    );
                    continue;
                }
                Err(e) => {
                    log::warn!(target: LOG, "execution={} callback postponed: {e}", row.execution_id);
                    continue;
                }
            };
            // Whatever the target answers, it must not stop this thread: a panic inside the
            // HTTP client is this row's failure, not the outbox's end.
            let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                agent
                    .post(&row.url)
                    .set("Content-Type", "application/json")
                    .set("User-Agent", concat!("etask/", env!("CARGO_PKG_VERSION")))
                    .send_string(&body.to_string())
                    // Boxed: ureq's error is large, and this Result travels through catch_unwind.
                    .map_err(Box::new)
            }));
            let sent: Result<(), String> = match sent {
                Ok(Ok(r)) if (200..300).contains(&r.status()) => Ok(()),
                // 3xx included: redirects are not followed (they could lead anywhere).
                Ok(Ok(r)) => Err(format!("HTTP {}", r.status())),
                Ok(Err(e)) => match *e {
                    ureq::Error::Status(code, _) => Err(format!("HTTP {code}")),
                    ureq::Error::Transport(t) => Err(t.to_string()),
                },
                Err(_) => {
                    log::error!(target: LOG, "execution={} callback: the HTTP client panicked", row.execution_id);
                    Err("internal error of the HTTP client".into())
                }
            };
            match sent {
                Ok(()) => {
                    log::info!(target: LOG, "execution={} callback delivered url={}", row.execution_id, row.url);
                    core.metrics
                        .callbacks_sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = core.store.outbox_result(row.id, true, None, None);
                }
                Err(err) => {
                    let attempts = row.attempts + 1;
                    let next = (attempts < i64::from(cfg.max_attempts)).then(|| {
                        let exp = (attempts - 1).clamp(0, 30) as u32;
                        now_ms()
                            + cfg
                                .initial_backoff_ms
                                .saturating_mul(1 << exp)
                                .min(cfg.max_backoff_ms) as i64
                    });
                    match next {
                        Some(_) => {
                            log::warn!(target: LOG, "execution={} callback attempt {attempts} failed: {err}; will retry", row.execution_id)
                        }
                        None => {
                            log::error!(target: LOG, "execution={} callback given up after {attempts} attempts: {err}", row.execution_id);
                            core.metrics
                                .callbacks_failed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    let _ = core.store.outbox_result(row.id, false, Some(&err), next);
                }
            }
        }
        if due.len() < 32 {
            crossbeam_channel::select! {
                recv(wake) -> _ => {}
                recv(core.shutdown.channel()) -> _ => {}
                default(Duration::from_millis(500)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_internal_addresses_are_refused_and_others_allowed() {
        let p = Policy::new(&[]).unwrap();
        for bad in [
            "http://127.0.0.1/x",
            "http://127.9.9.9:8765/",
            "http://localhost/x",
            "http://a.localhost/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::169.254.169.254]/",
            "http://[64:ff9b:1::a9fe:a9fe]/",
            "http://[2002:7f00:1::]/",
            "http://[2002:a9fe:a9fe::1]/",
            "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", // Teredo of 127.0.0.1
            "http://0.0.0.0/",
            "https://127.0.0.1/hook",
            "ftp://ecmdb.example/hook",
            "http://u:p@ecmdb.example/hook",
        ] {
            assert!(p.check_url(bad).is_err(), "{bad} accepted");
        }
        for good in [
            "http://ecmdb.example/hook",
            "https://ecmdb.example/hook",
            "http://10.1.2.3:8080/hook",
            "http://[2001:db8::1]/",
        ] {
            assert!(p.check_url(good).is_ok(), "{good} refused");
        }
        assert!(
            !p.allows("ecmdb.example", "127.0.0.1".parse().unwrap()),
            "a name resolving to loopback"
        );
        assert!(!p.allows("x", "169.254.169.254".parse().unwrap()));
    }

    #[test]
    fn a_list_allows_only_what_it_names() {
        let p = Policy::new(&[
            "127.0.0.1".into(),
            "10.0.0.0/8".into(),
            "ecmdb.internal".into(),
        ])
        .unwrap();
        assert!(p.check_url("http://127.0.0.1:9/x").is_ok());
        assert!(p.check_url("http://10.20.30.40/x").is_ok());
        assert!(p.check_url("http://ECMDB.internal/x").is_ok());
        assert!(p.check_url("http://11.0.0.1/x").is_err());
        assert!(p.check_url("http://other.example/x").is_err());
        assert!(p.allows("ecmdb.internal", "192.0.2.7".parse().unwrap()));
        assert!(
            !p.allows("ecmdb.internal", "127.0.0.2".parse().unwrap()),
            "a listed name does not open loopback"
        );
        assert!(Policy::new(&["10.0.0.0/99".into()]).is_err());
        assert!(Policy::new(&["".into()]).is_err());
    }
}
