//! The contract with the TLS layer (built in the `tls` branch, which replaces this file): the verified
//! client certificate's subject, put into each request's extensions when the client presented one.

/// The subject of the client certificate the TLS layer verified for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSubject(pub String);
