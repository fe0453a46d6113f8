//! The protobuf codec of every generated client and server: prost's, with a
//! first buffer sized for this contract's messages instead of tonic's 8 KiB.
//!
//! A call's encode buffer lives as long as the call, and a call waiting for
//! a slot on a busy service has already built it. With 10,000 sagas in
//! flight against a slow shipping service, those buffers were 78 MB of the
//! orchestrator's heap (heaptrack; docs/benchmarks.md). Every request and
//! reply here is far under 1 KiB; a larger one grows its buffer as before.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The first size of a call's encode and decode buffers.
pub const FIRST_BUFFER_BYTES: usize = 1024;

/// tonic's default: how much a stream encodes before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`FIRST_BUFFER_BYTES`] buffers.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(std::marker::PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(FIRST_BUFFER_BYTES, YIELD_THRESHOLD)
}
