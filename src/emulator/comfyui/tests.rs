//! Behaviour tests through real sockets (reqwest + tokio-tungstenite on 127.0.0.1), plus replays of the
//! captured traces in `replay`.

mod faults;
mod harness;
mod pixels;
mod replay;
mod server;
