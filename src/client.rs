//! The HTTP client behind `etask submit/get/logs/cancel/tasks`: thin calls to the intake API
//! that turn API errors into one readable line.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::Value;

/// Why a call to the scheduler failed; the CLI turns each kind into its exit status.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The scheduler answered with an API error (`{"error": {"code", "message"}}`).
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// No answer: connection refused, DNS, timeout.
    Unreachable(String),
    /// An answer that is not the API's JSON (a proxy, another service on the port).
    BadResponse(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Api {
                status,
                code,
                message,
            } => write!(f, "{code} (HTTP {status}): {message}"),
            ClientError::Unreachable(m) | ClientError::BadResponse(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClientError {}

/// How long any read from the scheduler may wait for its next byte.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Client {
        // A read that waits 30 s for a byte ends the call: a scheduler answers at once, and a
        // log follow gets a keep-alive line every 5 s, so only a stalled or hostile peer hits
        // it (`logs -f` used to wait for one forever).
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(READ_TIMEOUT)
            .build();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()),
            agent,
        }
    }

    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// The typed error of a failed request.
    fn error(&self, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, resp) => {
                let v: Value = resp.into_json().unwrap_or(Value::Null);
                let text = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
                match (text("/error/code"), text("/error/message")) {
                    (Some(code), Some(message)) => ClientError::Api {
                        status,
                        code,
                        message,
                    },
                    // Not the API's error shape: another service on the port, a proxy. Its
                    // 404 is no "no such execution" (66) — an answer etask does not understand.
                    _ => ClientError::BadResponse(format!(
                        "bad response from {}: HTTP {status} without the API's error body (is \
                         this an ETask scheduler?)",
                        self.base
                    )),
                }
            }
            ureq::Error::Transport(t) => ClientError::Unreachable(format!(
                "cannot reach the scheduler at {}: {t}",
                self.base
            )),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let r = self.req(method, path).timeout(Duration::from_secs(60));
        let res = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        match res {
            Ok(resp) => match resp.into_json::<Value>() {
                // Every answer of the API is an object: anything else is not the API talking.
                Ok(v) if v.is_object() => Ok(v),
                Ok(v) => Err(ClientError::BadResponse(format!(
                    "bad response from {}: a JSON object was expected, not {}",
                    self.base,
                    crate::client::shape(&v)
                ))),
                Err(e) => Err(ClientError::BadResponse(format!(
                    "bad response from {}: {e}",
                    self.base
                ))),
            },
            Err(e) => Err(self.error(e)),
        }
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("POST", path, Some(body))
    }

    /// Streams log lines (JSON) to `each` until the server ends the response.
    pub fn logs(
        &self,
        id: i64,
        after: i64,
        follow: bool,
        mut each: impl FnMut(&Value),
    ) -> Result<(), ClientError> {
        let path = format!("/api/v1/executions/{id}/logs?after_seq={after}&follow={follow}");
        let resp = self.req("GET", &path).call().map_err(|e| self.error(e))?;
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.map_err(|e| {
                ClientError::Unreachable(format!("log stream from {} broken: {e}", self.base))
            })?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                each(&v);
            }
        }
        Ok(())
    }
}

/// What kind of JSON value `v` is, for messages.
pub fn shape(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
