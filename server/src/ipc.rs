//! Arrow IPC from clients, checked before it is decoded.
//!
//! arrow-ipc allocates a compressed buffer's declared uncompressed length up front, before it
//! decompresses anything: a 100-byte batch that claims 2^62 bytes makes the allocator fail, and
//! Rust aborts the process (no panic to catch). Clients have no need to compress what they send to
//! a server on their network (uploads are stored as zstd parquet anyway), so compressed batches
//! from clients are refused, by reading only the message headers.

use arrow::ipc::{Message, MessageHeader, root_as_message};

use crate::error::{Error, Result};

/// Refuses an IPC message header (a FlightData's `data_header`) that announces compressed
/// buffers, or buffers outside its `body` of `body_len` bytes (the decoder slices them without a
/// check, and panics). An empty or unparsable header is left to the decoder, which reports it.
pub fn check_header(header: &[u8], body_len: usize) -> Result<()> {
    if header.is_empty() {
        return Ok(());
    }
    match root_as_message(header) {
        Ok(message) => check_message(message, body_len),
        Err(_) => Ok(()),
    }
}

fn check_message(message: Message<'_>, body_len: usize) -> Result<()> {
    let batch = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch(),
        MessageHeader::DictionaryBatch => {
            message.header_as_dictionary_batch().and_then(|d| d.data())
        }
        _ => None,
    };
    let Some(batch) = batch else {
        return Ok(());
    };
    if batch.compression().is_some() {
        return Err(Error::invalid(
            "compressed Arrow IPC buffers are not accepted from clients: send them uncompressed \
             (pyarrow: IpcWriteOptions(compression=None))",
        ));
    }
    let inside = |offset: i64, length: i64| {
        usize::try_from(offset)
            .ok()
            .zip(usize::try_from(length).ok())
            .and_then(|(o, l)| o.checked_add(l))
            .is_some_and(|end| end <= body_len)
    };
    if let Some(buffers) = batch.buffers()
        && !buffers.iter().all(|b| inside(b.offset(), b.length()))
    {
        return Err(Error::invalid(
            "malformed Arrow IPC batch: a buffer lies outside the message body",
        ));
    }
    Ok(())
}

/// Checks every message of an IPC stream (`bytes` as a StreamWriter writes them) with
/// [`check_header`], and that each message's body lies within `bytes`, without decoding any.
pub fn check_stream(bytes: &[u8]) -> Result<()> {
    let malformed = || Error::invalid("malformed Arrow IPC stream");
    let mut at = 0usize;
    while at < bytes.len() {
        let word = |at: usize| -> Result<u32> {
            let b = bytes.get(at..at + 4).ok_or_else(malformed)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let mut length = word(at)?;
        at += 4;
        if length == 0xFFFF_FFFF {
            length = word(at)?;
            at += 4;
        }
        if length == 0 {
            break; // end of stream
        }
        let end = at.checked_add(length as usize).ok_or_else(malformed)?;
        let header = bytes.get(at..end).ok_or_else(malformed)?;
        let message = root_as_message(header).map_err(|_| malformed())?;
        let body = usize::try_from(message.bodyLength()).map_err(|_| malformed())?;
        check_message(message, body)?;
        // The reader allocates a message's declared body before reading it: a body that claims
        // more than the stream holds is refused here.
        at = end.checked_add(body).ok_or_else(malformed)?;
        if at > bytes.len() {
            return Err(malformed());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::ipc::CompressionType;
    use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};

    use super::*;

    fn stream(compression: Option<CompressionType>) -> Vec<u8> {
        let batch = RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int64Array::from(vec![1, 2, 3])) as arrow::array::ArrayRef,
        )])
        .expect("batch");
        let options = IpcWriteOptions::default()
            .try_with_compression(compression)
            .expect("options");
        let mut writer =
            StreamWriter::try_new_with_options(Vec::new(), &batch.schema(), options).expect("w");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
        writer.into_inner().expect("bytes")
    }

    #[test]
    fn compressed_streams_are_refused_plain_ones_pass() {
        assert!(check_stream(&stream(None)).is_ok());
        assert!(check_stream(&stream(Some(CompressionType::LZ4_FRAME))).is_err());
        assert!(check_stream(&stream(Some(CompressionType::ZSTD))).is_err());
        assert!(check_stream(b"\xff\xff\xff\xff\x10\x00\x00\x00abc").is_err());
        assert!(check_stream(&[]).is_ok());
        // A body that claims more than the stream holds (the reader would allocate it).
        let plain = stream(None);
        assert!(check_stream(&plain[..plain.len() - 16]).is_err());
    }
}
