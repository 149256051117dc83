//! Behaviour tests through real sockets (reqwest + tokio-tungstenite on 127.0.0.1), plus replays of the
//! captured traces in `replay` (0.3.64 as captured; 0.38 as the capture plus NEWER.md's differences), and
//! the 0.38 generation's own behaviour in `newer`.

mod faults;
mod harness;
mod newer;
mod pixels;
mod replay;
mod server;
