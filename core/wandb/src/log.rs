//! The framing of a `.wandb` file: a 7-byte file header, then a LevelDB-style log.
//!
//! The log is cut into 32 KiB blocks counted from the start of the file (so the first
//! block holds 7 bytes less, because of the file header). A record is written as one or
//! more chunks; each chunk has a 7-byte header: CRC-32 (IEEE) of the type byte followed
//! by the payload (u32 LE), the payload length (u16 LE) and the type byte (1 full,
//! 2 first, 3 middle, 4 last). A chunk header never straddles a block: when fewer than
//! 7 bytes are left in a block they are zero-filled and the next chunk starts the next
//! block. With exactly 7 bytes left, a chunk with an empty payload is written there,
//! as LevelDB does.

use std::io::{self, Write};

use crate::Error;

/// The bytes every `.wandb` file starts with: `:W&B`, 0xBEE1 as u16 LE, version 0.
pub(crate) const FILE_HEADER: [u8; 7] = [b':', b'W', b'&', b'B', 0xE1, 0xBE, 0];
/// Size of a log block.
pub(crate) const BLOCK_SIZE: usize = 32 * 1024;
/// Size of a chunk header.
pub(crate) const CHUNK_HEADER: usize = 7;

pub(crate) const FULL: u8 = 1;
pub(crate) const FIRST: u8 = 2;
pub(crate) const MIDDLE: u8 = 3;
pub(crate) const LAST: u8 = 4;

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it) of the concatenation of `parts`.
pub(crate) fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for part in parts {
        for &b in *part {
            c = CRC_TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// Appends records to a `.wandb` log. Every record is handed to the underlying writer
/// with a single `write_all` followed by `flush`, so what was logged is on its way to
/// the file even if the process dies right after.
pub(crate) struct LogWriter<W: Write> {
    out: W,
    /// Offset inside the current block.
    block_offset: usize,
}

impl<W: Write> LogWriter<W> {
    /// Writes the file header and returns a writer positioned after it.
    pub(crate) fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&FILE_HEADER)?;
        out.flush()?;
        Ok(LogWriter {
            out,
            block_offset: FILE_HEADER.len(),
        })
    }

    /// Frames `record` into chunks and writes them.
    pub(crate) fn append(&mut self, record: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(record.len() + 2 * CHUNK_HEADER + 16);
        let mut rest = record;
        let mut first = true;
        loop {
            let left = BLOCK_SIZE - self.block_offset;
            if left < CHUNK_HEADER {
                buf.resize(buf.len() + left, 0);
                self.block_offset = 0;
                continue;
            }
            let n = rest.len().min(left - CHUNK_HEADER);
            let last = n == rest.len();
            let kind = match (first, last) {
                (true, true) => FULL,
                (true, false) => FIRST,
                (false, false) => MIDDLE,
                (false, true) => LAST,
            };
            let payload = &rest[..n];
            buf.extend_from_slice(&crc32(&[&[kind], payload]).to_le_bytes());
            buf.extend_from_slice(&(n as u16).to_le_bytes());
            buf.push(kind);
            buf.extend_from_slice(payload);
            self.block_offset += CHUNK_HEADER + n;
            rest = &rest[n..];
            first = false;
            if last {
                break;
            }
        }
        self.out.write_all(&buf)?;
        self.out.flush()
    }

    pub(crate) fn get_ref(&self) -> &W {
        &self.out
    }
}

/// Reads the records of a `.wandb` file held in memory.
///
/// Yields each record's payload; after the first error (bad header, CRC mismatch, chunk
/// out of order, truncated chunk) it yields that error once and then stops. A file that
/// ends exactly after a complete record, or inside zero padding at a block's end, ends
/// cleanly.
pub(crate) struct LogReader<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> LogReader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Result<Self, Error> {
        if data.len() < FILE_HEADER.len() {
            return Err(Error::Format(
                "file shorter than the 7-byte W&B header".into(),
            ));
        }
        if data[..4] != FILE_HEADER[..4] || data[4..6] != FILE_HEADER[4..6] {
            return Err(Error::Format(
                "missing the ':W&B' magic and 0xBEE1 marker".into(),
            ));
        }
        if data[6] != 0 {
            return Err(Error::Format(format!(
                "unsupported W&B file version {}",
                data[6]
            )));
        }
        Ok(LogReader {
            data,
            pos: FILE_HEADER.len(),
            failed: false,
        })
    }

    fn fail(&mut self, msg: String) -> Option<Result<Vec<u8>, Error>> {
        self.failed = true;
        Some(Err(Error::Format(format!("at byte {}: {msg}", self.pos))))
    }
}

impl Iterator for LogReader<'_> {
    type Item = Result<Vec<u8>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let mut assembled: Option<Vec<u8>> = None;
        loop {
            let left = BLOCK_SIZE - self.pos % BLOCK_SIZE;
            if left < CHUNK_HEADER {
                let end = (self.pos + left).min(self.data.len());
                if self.data[self.pos..end].iter().any(|&b| b != 0) {
                    return self.fail("block trailer is not zero-filled".into());
                }
                self.pos = end;
            }
            if self.pos == self.data.len() {
                if assembled.is_some() {
                    return self.fail("file ends inside a record".into());
                }
                return None;
            }
            if self.pos + CHUNK_HEADER > self.data.len() {
                return self.fail("file ends inside a chunk header".into());
            }
            let h = &self.data[self.pos..self.pos + CHUNK_HEADER];
            let crc = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let len = u16::from_le_bytes([h[4], h[5]]) as usize;
            let kind = h[6];
            let start = self.pos + CHUNK_HEADER;
            if len > BLOCK_SIZE - start % BLOCK_SIZE || start + len > self.data.len() {
                if start + len > self.data.len() {
                    return self.fail("file ends inside a chunk".into());
                }
                return self.fail(format!("chunk of {len} bytes crosses a block boundary"));
            }
            let payload = &self.data[start..start + len];
            if crc32(&[&[kind], payload]) != crc {
                return self.fail(format!("CRC mismatch in a chunk of type {kind}"));
            }
            self.pos = start + len;
            match (kind, assembled.as_mut()) {
                (FULL, None) => return Some(Ok(payload.to_vec())),
                (FIRST, None) => assembled = Some(payload.to_vec()),
                (MIDDLE, Some(buf)) => buf.extend_from_slice(payload),
                (LAST, Some(buf)) => {
                    buf.extend_from_slice(payload);
                    return assembled.map(Ok);
                }
                (FULL | FIRST, Some(_)) => {
                    return self.fail("a new record starts before the previous one ended".into())
                }
                (MIDDLE | LAST, None) => {
                    return self.fail("a continuation chunk without a first chunk".into())
                }
                (other, _) => return self.fail(format!("unknown chunk type {other}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(records: &[Vec<u8>]) -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new()).unwrap();
        for r in records {
            w.append(r).unwrap();
        }
        w.out
    }

    fn read_all(data: &[u8]) -> Vec<Vec<u8>> {
        LogReader::new(data)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    /// Walks the chunk headers of a file: (offset, length, type).
    fn chunks(data: &[u8]) -> Vec<(usize, usize, u8)> {
        let mut out = Vec::new();
        let mut pos = FILE_HEADER.len();
        while pos < data.len() {
            let left = BLOCK_SIZE - pos % BLOCK_SIZE;
            if left < CHUNK_HEADER {
                pos += left;
                continue;
            }
            let len = u16::from_le_bytes([data[pos + 4], data[pos + 5]]) as usize;
            out.push((pos, len, data[pos + 6]));
            pos += CHUNK_HEADER + len;
        }
        out
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn crc32_matches_the_ieee_check_values() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b""]), 0);
        assert_eq!(
            crc32(&[b"The quick brown fox ", b"jumps over the lazy dog"]),
            0x414F_A339
        );
    }

    #[test]
    fn small_records_round_trip_with_exact_bytes() {
        let data = write_all(&[b"abc".to_vec(), Vec::new()]);
        assert_eq!(&data[..7], b":W&B\xe1\xbe\x00");
        let crc = crc32(&[&[FULL], b"abc"]);
        assert_eq!(&data[7..11], &crc.to_le_bytes());
        assert_eq!(&data[11..14], &[3, 0, FULL]);
        assert_eq!(&data[14..17], b"abc");
        assert_eq!(data.len(), 17 + 7, "empty record is one empty FULL chunk");
        assert_eq!(read_all(&data), vec![b"abc".to_vec(), Vec::new()]);
    }

    #[test]
    fn a_record_crossing_several_blocks_is_split_first_middle_last() {
        let big = pattern(3 * BLOCK_SIZE + 1234, 7);
        let records = vec![b"before".to_vec(), big.clone(), b"after".to_vec()];
        let data = write_all(&records);
        assert_eq!(read_all(&data), records);
        let kinds: Vec<u8> = chunks(&data).iter().map(|c| c.2).collect();
        assert_eq!(kinds, vec![FULL, FIRST, MIDDLE, MIDDLE, LAST, FULL]);
        // The first chunk of the big record fills the first block to its end.
        let (off, len, _) = chunks(&data)[1];
        assert_eq!(off + CHUNK_HEADER + len, BLOCK_SIZE);
        // Every middle chunk is a whole block.
        for &(off, len, kind) in &chunks(&data)[2..4] {
            assert_eq!(kind, MIDDLE);
            assert_eq!(off % BLOCK_SIZE, 0);
            assert_eq!(len, BLOCK_SIZE - CHUNK_HEADER);
        }
    }

    #[test]
    fn block_tails_shorter_than_a_header_are_zero_filled() {
        // First record leaves exactly 3 bytes in the first block.
        let first_len = BLOCK_SIZE - FILE_HEADER.len() - CHUNK_HEADER - 3;
        let records = vec![vec![0xAB; first_len], b"next".to_vec()];
        let data = write_all(&records);
        assert_eq!(&data[BLOCK_SIZE - 3..BLOCK_SIZE], &[0, 0, 0]);
        assert_eq!(
            data[BLOCK_SIZE + 6],
            FULL,
            "next record starts the second block"
        );
        assert_eq!(&data[BLOCK_SIZE + 7..], b"next");
        assert_eq!(read_all(&data), records);
    }

    #[test]
    fn exactly_a_header_left_gets_an_empty_first_chunk() {
        let first_len = BLOCK_SIZE - FILE_HEADER.len() - 2 * CHUNK_HEADER;
        let records = vec![vec![1; first_len], b"spills".to_vec()];
        let data = write_all(&records);
        let c = chunks(&data);
        assert_eq!(c[1], (BLOCK_SIZE - CHUNK_HEADER, 0, FIRST));
        assert_eq!(c[2], (BLOCK_SIZE, 6, LAST));
        assert_eq!(read_all(&data), records);
    }

    #[test]
    fn every_split_point_round_trips() {
        // Records of growing sizes so that boundaries land at every offset near a block end.
        let records: Vec<Vec<u8>> = (0..300).map(|i| pattern(200 + i * 7, i as u8)).collect();
        let data = write_all(&records);
        assert!(data.len() > 5 * BLOCK_SIZE);
        assert_eq!(read_all(&data), records);
    }

    #[test]
    fn corruption_and_truncation_are_reported() {
        let records = vec![pattern(100, 1), pattern(BLOCK_SIZE, 2)];
        let data = write_all(&records);

        let mut bad = data.clone();
        bad[7 + CHUNK_HEADER + 10] ^= 0x40;
        let first = LogReader::new(&bad).unwrap().next().unwrap();
        assert!(matches!(first, Err(Error::Format(m)) if m.contains("CRC")));

        let cut = &data[..data.len() - 5];
        let got: Vec<_> = LogReader::new(cut).unwrap().collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap(), &records[0]);
        assert!(got[1].is_err());

        assert!(LogReader::new(b":W&B\xe1\xbe").is_err());
        assert!(LogReader::new(b"LEVELDB").is_err());
        assert!(LogReader::new(b":W&B\xe1\xbe\x01").is_err());
    }
}
