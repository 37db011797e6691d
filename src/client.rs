//! The HTTP client behind `etask submit/get/logs/cancel/tasks`: thin calls to the intake API
//! that turn API errors into one readable line.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::Value;

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
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

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let r = self.req(method, path).timeout(Duration::from_secs(60));
        let res = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        match res {
            Ok(resp) => resp
                .into_json()
                .map_err(|e| format!("bad response from {}: {e}", self.base)),
            Err(ureq::Error::Status(code, resp)) => {
                let v: Value = resp.into_json().unwrap_or(Value::Null);
                let msg = v
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("no message");
                let kind = v
                    .pointer("/error/code")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                Err(format!("{kind} (HTTP {code}): {msg}"))
            }
            Err(ureq::Error::Transport(t)) => {
                Err(format!("cannot reach the scheduler at {}: {t}", self.base))
            }
        }
    }

    pub fn get(&self, path: &str) -> Result<Value, String> {
        self.call("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.call("POST", path, Some(body))
    }

    /// Streams log lines (JSON) to `each` until the server ends the response.
    pub fn logs(
        &self,
        id: i64,
        after: i64,
        follow: bool,
        mut each: impl FnMut(&Value),
    ) -> Result<(), String> {
        let path = format!("/api/v1/executions/{id}/logs?after_seq={after}&follow={follow}");
        let resp = match self.req("GET", &path).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, resp)) => {
                let v: Value = resp.into_json().unwrap_or(Value::Null);
                return Err(format!(
                    "HTTP {code}: {}",
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                ));
            }
            Err(e) => return Err(format!("cannot reach the scheduler at {}: {e}", self.base)),
        };
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.map_err(|e| format!("log stream broken: {e}"))?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                each(&v);
            }
        }
        Ok(())
    }
}
