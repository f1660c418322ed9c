//! Rows of reference logits kept in an unlinked temporary file, so that a causal LM's
//! reference (one vocabulary-wide row per input position) costs disk, not memory, while the
//! candidates are compared with it one position at a time.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};

use crate::error::{Error, Result};

/// Equal-width rows of f32, written once in order and read back in the same order.
pub struct RowSpill {
    file: File,
    width: Option<usize>,
    rows: u64,
}

impl RowSpill {
    /// An empty store in the system's temporary folder (removed when dropped).
    pub fn new() -> Result<RowSpill> {
        let file = tempfile::tempfile().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        Ok(RowSpill {
            file,
            width: None,
            rows: 0,
        })
    }

    /// Appends a row; every row must have the first row's width.
    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        match self.width {
            None => self.width = Some(row.len()),
            Some(w) if w != row.len() => {
                return Err(Error::usage(format!(
                    "logit rows of {} and {w} values: the vocabulary changed between positions",
                    row.len()
                )))
            }
            Some(_) => {}
        }
        let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
        (&self.file)
            .write_all(&bytes)
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        self.rows += 1;
        Ok(())
    }

    /// Rows pushed so far.
    pub fn len(&self) -> u64 {
        self.rows
    }

    /// True before the first push.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// A reader from the first row.
    pub fn reader(&self) -> Result<RowReader<'_>> {
        (&self.file)
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        Ok(RowReader {
            r: BufReader::with_capacity(1 << 20, &self.file),
            width: self.width.unwrap_or(0),
            left: self.rows,
            bytes: Vec::new(),
        })
    }
}

/// Reads a [`RowSpill`]'s rows in order.
pub struct RowReader<'a> {
    r: BufReader<&'a File>,
    width: usize,
    left: u64,
    bytes: Vec<u8>,
}

impl RowReader<'_> {
    /// The next row into `out`; an error past the last row.
    pub fn next_row(&mut self, out: &mut Vec<f32>) -> Result<()> {
        if self.left == 0 {
            return Err(Error::usage(
                "a candidate produced more positions than the reference",
            ));
        }
        self.left -= 1;
        self.bytes.resize(self.width * 4, 0);
        self.r
            .read_exact(&mut self.bytes)
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        out.clear();
        out.extend(
            self.bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_in_order_twice() {
        let mut s = RowSpill::new().unwrap();
        s.push(&[1.0, 2.0, f32::NAN]).unwrap();
        s.push(&[-0.0, 5.5, f32::INFINITY]).unwrap();
        assert!(s.push(&[1.0]).is_err(), "width is fixed by the first row");
        assert_eq!(s.len(), 2);
        for _ in 0..2 {
            let mut r = s.reader().unwrap();
            let mut row = Vec::new();
            r.next_row(&mut row).unwrap();
            assert_eq!(row[..2], [1.0, 2.0]);
            assert!(row[2].is_nan());
            r.next_row(&mut row).unwrap();
            assert_eq!(
                row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                [
                    (-0.0f32).to_bits(),
                    5.5f32.to_bits(),
                    f32::INFINITY.to_bits()
                ]
            );
            assert!(r.next_row(&mut row).is_err());
        }
    }
}
