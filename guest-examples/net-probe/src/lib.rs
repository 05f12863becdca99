//! Hostile: tries the network. `{"attack": "connect", "address": "1.2.3.4:80"}`
//! or `{"attack": "dns", "host": "example.com"}`; the output says whether it
//! was refused.
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};

use serde::{Deserialize, Serialize};
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
struct Input {
    attack: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    host: String,
}

#[derive(Serialize)]
struct Output {
    outcome: String,
}

#[step]
fn run(input: Input) -> Result<Output, StepError> {
    let result: std::io::Result<String> = match input.attack.as_str() {
        "connect" => TcpStream::connect(&input.address).map(|_| "connected".into()),
        "udp" => UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| socket.send_to(b"x", &input.address))
            .map(|n| format!("sent {n} bytes")),
        "dns" => (input.host.as_str(), 80).to_socket_addrs().map(|addrs| format!("{} addresses", addrs.count())),
        other => Ok(format!("unknown attack {other}")),
    };
    let outcome = match result {
        Ok(done) => format!("done: {done}"),
        Err(err) => format!("refused: {err}"),
    };
    Ok(Output { outcome })
}
