//! The client side of the protocol, pure like the server side: negotiation
//! (`handshake`), request encoding and reply decoding (`codec`), and the
//! streaming reply parser (`replies`). ringnbd-bench drives them over its
//! rings; the server's own tests and fuzz targets check the server's
//! encoders and decoders against them (`decode(encode(x)) == x`).

pub mod codec;
pub mod handshake;
pub mod replies;
