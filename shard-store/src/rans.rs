//! The `pca` codec's entropy coder: rANS with [`LANES`] interleaved states,
//! 16-bit renormalisation and static per-context frequency tables, laid out
//! so that a decoder can run the lanes in SIMD (FORMAT.md, "The `pca`
//! codec").
//!
//! Symbols are bytes. The `N` symbols of a record come in runs of `run`
//! symbols that share a context (a table): symbol `j` uses table `j / run`
//! and state `j mod LANES`. A byte that its table gives no frequency goes
//! through the escape symbol and is stored raw in a side array, so that
//! every lane decodes exactly one symbol per step (lockstep SIMD).
//!
//! Three decoders give the same bytes (tested): AVX-512 (F, BW and VL:
//! Skylake-X, Ice Lake, Sapphire Rapids, Zen 4 and later) with four vectors
//! of 16 lanes, four independent dependency chains, which is what it takes
//! to hide the latency of a step (64 lanes decode 1.2x faster than 32 on a
//! DINOv2 store; 128 are no faster); AVX2 with eight vectors of 8 lanes;
//! and the scalar reference, for other CPUs. [`decoder`] picks one.

/// Interleaved states per record.
pub const LANES: usize = 64;
/// Bits of the frequency tables (frequencies sum to `2^12`).
pub const SCALE_BITS: u32 = 12;
const M: u32 = 1 << SCALE_BITS;
/// Lower bound of a normalised state; words are 16 bits.
const RANS_L: u32 = 1 << 16;
/// The escape symbol's index in a frequency table.
pub const ESC: usize = 256;
/// Symbols per table: 256 bytes and the escape.
pub const SYMBOLS: usize = 257;
/// Slots per bucket of the decoding tables.
const RUN: u32 = 8;
const BUCKETS: usize = (M / RUN) as usize;

/// Frequency tables, one per context, in the forms the coder needs.
#[derive(Debug, Clone)]
pub struct Tables {
    /// `freq[ctx][s]`, summing to `2^12` per context.
    freq: Vec<[u16; SYMBOLS]>,
    /// Cumulative start of each symbol.
    start: Vec<[u16; SYMBOLS]>,
    /// Per context, for each run of 8 slots, the index in `entries` of the
    /// symbol holding the run's first slot: the decoder starts there and
    /// steps forward while the slot lies past the symbol's end (rarely).
    /// 512 bytes per context (a slot-by-slot table would take 4 KB and
    /// fall out of the cache), plus 4 bytes of padding for 32-bit gathers.
    bucket: Vec<u8>,
    /// Per context, 256 entries `start | freq << 12 | byte << 24` of the
    /// symbols with a non-zero frequency, ascending, padded with copies of
    /// the last one (whose end is 4096, so the decoder's search stops
    /// there). The escape's byte is the context's `marker`.
    entries: Vec<u32>,
    /// Per context, the smallest byte without a frequency (it stands for
    /// the escape in decoded output), or 256 when there is no escape.
    marker: Vec<u16>,
    /// Per context, the number of symbols with a frequency ...
    symbols: Vec<u16>,
    /// ... and the ends (`start + freq`) of the first 32, ascending,
    /// padded with 4096.
    small_ends: Vec<[u32; 32]>,
}

impl Tables {
    /// Tables from frequencies; `None` unless every context sums to `2^12`
    /// and has an escape exactly when some byte has no frequency.
    pub fn new(freq: Vec<[u16; SYMBOLS]>) -> Option<Self> {
        let n = freq.len();
        let mut start = vec![[0u16; SYMBOLS]; n];
        let mut bucket = vec![0u8; n * BUCKETS + 4];
        let mut entries = vec![0u32; n * 256];
        let mut marker = vec![256u16; n];
        let mut symbols = vec![0u16; n];
        let mut small_ends = vec![[M; 32]; n];
        for (c, f) in freq.iter().enumerate() {
            let total: u32 = f.iter().map(|&x| u32::from(x)).sum();
            let all_bytes = f[..256].iter().all(|&x| x > 0);
            if total != M || (f[ESC] > 0) == all_bytes {
                return None;
            }
            if f[ESC] > 0 {
                marker[c] = f[..256].iter().position(|&x| x == 0).unwrap_or(256) as u16;
            }
            let used: Vec<usize> = (0..SYMBOLS).filter(|&s| f[s] > 0).collect();
            let e = &mut entries[c * 256..(c + 1) * 256];
            let mut acc = 0u32;
            for (i, &s) in used.iter().enumerate() {
                let fs = u32::from(f[s]);
                start[c][s] = acc as u16;
                let byte = if s == ESC { u32::from(marker[c]) } else { s as u32 };
                e[i] = acc | fs << 12 | byte << 24;
                for b in acc.div_ceil(RUN)..(acc + fs).div_ceil(RUN) {
                    bucket[c * BUCKETS + b as usize] = i as u8;
                }
                acc += fs;
            }
            // `used` has at most 256 symbols: the escape replaces a byte
            let last = e[used.len() - 1];
            e[used.len()..].fill(last);
            symbols[c] = used.len() as u16;
            for (end, &entry) in small_ends[c].iter_mut().zip(&e[..used.len()]) {
                *end = (entry & 0xfff) + ((entry >> 12) & 0xfff);
            }
        }
        Some(Self { freq, start, bucket, entries, marker, symbols, small_ends })
    }

    /// The frequencies of context `c`.
    #[cfg(test)]
    fn freq(&self, c: usize) -> &[u16; SYMBOLS] {
        &self.freq[c]
    }

    /// The largest record of `n` symbols: the header, one escape byte and
    /// one word per symbol at most. `None` when it does not fit a `u64`.
    pub fn max_encoded_len(n: u64) -> Option<u64> {
        n.checked_mul(3)?.checked_add(4 + 4 * LANES as u64)
    }

    /// Append the record of `symbols` (context `j / run` for symbol `j`).
    ///
    /// # Panics
    /// If `symbols` needs a context past the last table.
    pub fn encode(&self, symbols: &[u8], run: usize, out: &mut Vec<u8>) {
        let run = run.max(1);
        // context by context (no division per symbol)
        let escapes: Vec<u8> = symbols
            .chunks(run)
            .enumerate()
            .flat_map(|(c, chunk)| chunk.iter().copied().filter(move |&s| self.freq[c][usize::from(s)] == 0))
            .collect();
        let mut state = [RANS_L; LANES];
        let mut words: Vec<u16> = Vec::with_capacity(symbols.len() / 2);
        for (c, chunk) in symbols.chunks(run).enumerate().rev() {
            let (freq, start) = (&self.freq[c], &self.start[c]);
            for (i, &s) in chunk.iter().enumerate().rev() {
                let s = if freq[usize::from(s)] > 0 { usize::from(s) } else { ESC };
                let (f, st) = (u32::from(freq[s]), u32::from(start[s]));
                let x = &mut state[(c * run + i) % LANES];
                // ((L >> 12) << 16) * f: one word out keeps x below it
                if *x >= f << 20 {
                    words.push(*x as u16);
                    *x >>= 16;
                }
                *x = ((*x / f) << SCALE_BITS) + (*x % f) + st;
            }
        }
        out.reserve(4 + 4 * LANES + escapes.len() + 2 * words.len());
        out.extend_from_slice(&(escapes.len() as u32).to_le_bytes());
        for s in state {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&escapes);
        for w in words.iter().rev() {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }

    /// Decode a record of `out.len()` symbols. `false` when the record is
    /// not a valid encoding (too short, words or escapes left over or
    /// missing, final states wrong).
    pub fn decode(&self, bytes: &[u8], run: usize, out: &mut [u8]) -> bool {
        match decoder() {
            // SAFETY: `decoder` picks a SIMD path only on a CPU that has it.
            #[cfg(target_arch = "x86_64")]
            Decoder::Avx512 => self.decode_with(bytes, run, out, |t, s, w, r, o| unsafe { decode_avx512(t, s, w, r, o) }),
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Decoder::Avx2 => self.decode_with(bytes, run, out, |t, s, w, r, o| unsafe { decode_avx2(t, s, w, r, o) }),
            Decoder::Scalar => self.decode_with(bytes, run, out, decode_scalar),
        }
    }

    /// [`Tables::decode`] with the scalar (reference) lanes.
    #[cfg(test)]
    fn decode_reference(&self, bytes: &[u8], run: usize, out: &mut [u8]) -> bool {
        self.decode_with(bytes, run, out, decode_scalar)
    }

    /// [`Tables::decode`] with the AVX2 lanes, `None` on a CPU without AVX2.
    #[cfg(test)]
    fn decode_avx2(&self, bytes: &[u8], run: usize, out: &mut [u8]) -> Option<bool> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has the features, checked just above.
            return Some(self.decode_with(bytes, run, out, |t, s, w, r, o| unsafe { decode_avx2(t, s, w, r, o) }));
        }
        None
    }

    fn decode_with(
        &self,
        bytes: &[u8],
        run: usize,
        out: &mut [u8],
        lanes: impl FnOnce(&Self, &mut [u32; LANES], &[u8], usize, &mut [u8]) -> Option<usize>,
    ) -> bool {
        let run = run.max(1);
        if out.len().div_ceil(run) > self.freq.len() {
            return false;
        }
        let Some((head, rest)) = bytes.split_first_chunk::<{ 4 + 4 * LANES }>() else { return false };
        let word = |i: usize| u32::from_le_bytes([head[4 * i], head[4 * i + 1], head[4 * i + 2], head[4 * i + 3]]);
        let n_esc = word(0) as usize;
        let mut state: [u32; LANES] = std::array::from_fn(|l| word(l + 1));
        if n_esc > rest.len() || !(rest.len() - n_esc).is_multiple_of(2) || state.iter().any(|&s| s < RANS_L) {
            return false;
        }
        let (escapes, words) = rest.split_at(n_esc);
        if lanes(self, &mut state, words, run, out) != Some(words.len()) || state.iter().any(|&s| s != RANS_L) {
            return false;
        }
        // the escapes, in symbol order: each context's marker byte
        let mut next = escapes.iter();
        for (c, chunk) in out.chunks_mut(run).enumerate() {
            let m = self.marker[c];
            if m < 256 {
                let hits: Vec<usize> = memchr::memchr_iter(m as u8, chunk).collect();
                for i in hits {
                    match next.next() {
                        Some(&e) if self.freq[c][usize::from(e)] == 0 => chunk[i] = e,
                        _ => return false,
                    }
                }
            }
        }
        next.next().is_none()
    }
}

/// The decoders.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Decoder {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

/// The name of the decoder [`Tables::decode`] uses in this process:
/// `avx512`, `avx2` or `scalar`.
pub fn decoder_name() -> &'static str {
    match decoder() {
        #[cfg(target_arch = "x86_64")]
        Decoder::Avx512 => "avx512",
        #[cfg(target_arch = "x86_64")]
        Decoder::Avx2 => "avx2",
        Decoder::Scalar => "scalar",
    }
}

/// The fastest decoder this CPU runs, or the one named by the environment
/// variable `CAEV2_PCA_DECODER` (`avx512`, `avx2` or `scalar`; for
/// benchmarks: what a CPU without AVX-512 would see) where this CPU runs
/// it. Chosen once per process.
fn decoder() -> Decoder {
    static CHOICE: std::sync::OnceLock<Decoder> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let mut usable = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("popcnt") {
                usable.push(("avx512", Decoder::Avx512));
            }
            if has!("avx2") && has!("popcnt") {
                usable.push(("avx2", Decoder::Avx2));
            }
        }
        usable.push(("scalar", Decoder::Scalar));
        let asked = std::env::var("CAEV2_PCA_DECODER").ok();
        usable.iter().find(|(name, _)| asked.as_deref().is_none_or(|a| a == *name)).unwrap_or(&usable[0]).1
    })
}

/// The reference decoder: symbol by symbol, a word read right after the
/// symbol that needs it (the same order as "all lanes of a group, then
/// their words in lane order"). Returns the bytes of `words` consumed, or
/// `None` when they run out.
fn decode_scalar(t: &Tables, state: &mut [u32; LANES], words: &[u8], run: usize, out: &mut [u8]) -> Option<usize> {
    let mut pos = 0usize;
    for (c, chunk) in out.chunks_mut(run).enumerate() {
        let bucket = &t.bucket[c * BUCKETS..(c + 1) * BUCKETS];
        let entries = &t.entries[c * 256..(c + 1) * 256];
        let base = c * run;
        for (i, o) in chunk.iter_mut().enumerate() {
            let x = &mut state[(base + i) % LANES];
            let slot = *x & (M - 1);
            let mut e = usize::from(bucket[(slot / RUN) as usize]);
            while slot >= (entries[e] & 0xfff) + ((entries[e] >> 12) & 0xfff) {
                e = (e + 1) & 255;
            }
            let entry = entries[e];
            *x = ((entry >> 12) & 0xfff) * (*x >> SCALE_BITS) + slot - (entry & 0xfff);
            *o = (entry >> 24) as u8;
            if *x < RANS_L {
                let w = words.get(pos..pos + 2)?;
                *x = (*x << 16) | u32::from(u16::from_le_bytes([w[0], w[1]]));
                pos += 2;
            }
        }
    }
    Some(pos)
}

/// Where a vector of `live` symbols (no more than a run) lies, its first
/// symbol being at `place.1` in the run of context `place.0`: the contexts
/// of its first and its last symbol, and how many of its lanes lie in the
/// first. Then `place` moves one group of [`LANES`] on, by adding (a
/// division per vector would cost more than a decoding step).
#[inline(always)]
fn vector_contexts(place: &mut (usize, usize), live: usize, run: usize) -> (usize, usize, usize) {
    let (ca, at) = *place;
    let (cb, split) = if at + live <= run { (ca, live) } else { (ca + 1, run - at) };
    place.1 += LANES;
    while place.1 >= run {
        place.1 -= run;
        place.0 += 1;
    }
    (ca, cb, split)
}

/// The SIMD decoder: 16 lanes per vector, four vectors (one group of 64)
/// per step; lanes that need a word get consecutive words by one
/// masked load and an expand, in lane order.
///
/// A vector's 16 symbols lie in one context, or two where a run ends. A
/// context with at most 16 (or 32) symbols (most: the residuals are
/// peaked) keeps its symbol ends and entries in one (or two) registers
/// each, and each lane finds its symbol by a four- (or five-) step binary
/// search of permutes; others use gathers from the bucket and entry tables. Runs shorter than 16 symbols go to
/// the scalar decoder.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW, AVX-512VL and POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,popcnt")]
unsafe fn decode_avx512(t: &Tables, state: &mut [u32; LANES], words: &[u8], run: usize, out: &mut [u8]) -> Option<usize> {
    use std::arch::x86_64::*;
    const V: usize = LANES / 16;
    if run < 16 {
        return decode_scalar(t, state, words, run, out);
    }
    let n = out.len();
    let mask12 = _mm512_set1_epi32(0xfff);
    let one = _mm512_set1_epi32(1);
    let low16 = _mm512_set1_epi32(RANS_L as i32);
    let (bucket, entries) = (t.bucket.as_ptr(), t.entries.as_ptr().cast::<u8>());
    let end_of = |e: __m512i| _mm512_add_epi32(_mm512_and_si512(e, mask12), _mm512_and_si512(_mm512_srli_epi32::<12>(e), mask12));
    // the entry of each lane's symbol in context `c`, searched in registers
    let search = |c: usize, slot: __m512i| {
        let (ends, ent) = (t.small_ends[c].as_ptr(), t.entries[c * 256..].as_ptr());
        // i = the number of symbol ends <= slot (ends ascend; past the used
        // symbols they are 4096, above every slot): a binary search over
        // one register of ends (at most 16 symbols) or two
        // SAFETY: `small_ends[c]` holds 32 u32s, `entries` 256 per context.
        let (e0, n0) = unsafe { (_mm512_loadu_si512(ends.cast()), _mm512_loadu_si512(ent.cast())) };
        let mut i = _mm512_setzero_si512();
        if t.symbols[c] <= 16 {
            for stride in [8, 4, 2, 1] {
                let probe = _mm512_permutexvar_epi32(_mm512_add_epi32(i, _mm512_set1_epi32(stride - 1)), e0);
                i = _mm512_mask_add_epi32(i, _mm512_cmpge_epu32_mask(slot, probe), i, _mm512_set1_epi32(stride));
            }
            return _mm512_permutexvar_epi32(i, n0);
        }
        // SAFETY: as above.
        let (e1, n1) = unsafe { (_mm512_loadu_si512(ends.add(16).cast()), _mm512_loadu_si512(ent.add(16).cast())) };
        for stride in [16, 8, 4, 2, 1] {
            let probe = _mm512_permutex2var_epi32(e0, _mm512_add_epi32(i, _mm512_set1_epi32(stride - 1)), e1);
            i = _mm512_mask_add_epi32(i, _mm512_cmpge_epu32_mask(slot, probe), i, _mm512_set1_epi32(stride));
        }
        _mm512_permutex2var_epi32(n0, i, n1)
    };
    // SAFETY (all loads and stores below): `state` holds LANES u32s; the
    // gathers read only active lanes, whose context is below the number
    // of tables (checked by the caller), at bucket offsets below 512 (+3
    // bytes of padding) and entry offsets below 256; stores to `out` are
    // masked to the symbols that exist; the word loads are masked to the
    // `need` lanes, checked against the end of `words` first.
    let mut x: [__m512i; V] = std::array::from_fn(|v| unsafe { _mm512_loadu_si512(state.as_ptr().add(16 * v).cast()) });
    let mut pos = 0usize;
    let mut j0 = 0usize;
    let mut place: [(usize, usize); V] = std::array::from_fn(|v| (16 * v / run, 16 * v % run));
    while j0 < n {
        for (v, (xv, place)) in x.iter_mut().zip(&mut place).enumerate() {
            let jv = j0 + 16 * v;
            if jv >= n {
                break;
            }
            let live = (n - jv).min(16);
            let active: __mmask16 = if live == 16 { 0xffff } else { (1u16 << live) - 1 };
            let (ca, cb, split) = vector_contexts(place, live, run);
            // lanes in the second context
            let second: __mmask16 = if cb == ca { 0 } else { active & !((1u16 << split) - 1) };
            let slot = _mm512_and_si512(*xv, mask12);
            let e = if t.symbols[ca] <= 32 && t.symbols[cb] <= 32 {
                let e = search(ca, slot);
                if second == 0 { e } else { _mm512_mask_mov_epi32(e, second, search(cb, slot)) }
            } else {
                let ctx = _mm512_mask_mov_epi32(_mm512_set1_epi32(ca as i32), second, _mm512_set1_epi32(cb as i32));
                let bidx = _mm512_add_epi32(_mm512_slli_epi32::<9>(ctx), _mm512_srli_epi32::<3>(slot));
                let b = unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), active, bidx, bucket.cast()) };
                let mut eidx = _mm512_add_epi32(_mm512_slli_epi32::<8>(ctx), _mm512_and_si512(b, _mm512_set1_epi32(255)));
                let mut e = unsafe { _mm512_mask_i32gather_epi32::<4>(_mm512_setzero_si512(), active, eidx, entries.cast()) };
                let mut past = _mm512_mask_cmpge_epu32_mask(active, slot, end_of(e));
                while past != 0 {
                    eidx = _mm512_mask_add_epi32(eidx, past, eidx, one);
                    e = unsafe { _mm512_mask_i32gather_epi32::<4>(e, past, eidx, entries.cast()) };
                    past = _mm512_mask_cmpge_epu32_mask(past, slot, end_of(e));
                }
                e
            };
            let freq = _mm512_and_si512(_mm512_srli_epi32::<12>(e), mask12);
            let start = _mm512_and_si512(e, mask12);
            let nx = _mm512_sub_epi32(_mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srli_epi32::<12>(*xv)), slot), start);
            unsafe { _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(jv).cast(), active, _mm512_srli_epi32::<24>(e)) };
            let need = _mm512_mask_cmplt_epu32_mask(active, nx, low16);
            let count = need.count_ones() as usize;
            if pos + 2 * count > words.len() {
                return None;
            }
            // a masked load of the `count` words, widened to 32 bits and
            // expanded to the lanes that need them
            let loaded = unsafe { _mm256_maskz_loadu_epi16(((1u32 << count) - 1) as u16, words.as_ptr().add(pos).cast()) };
            let w = _mm512_maskz_expand_epi32(need, _mm512_cvtepu16_epi32(loaded));
            pos += 2 * count;
            let renormed = _mm512_mask_mov_epi32(nx, need, _mm512_or_si512(_mm512_slli_epi32::<16>(nx), w));
            *xv = _mm512_mask_mov_epi32(*xv, active, renormed);
        }
        j0 += LANES;
    }
    for (v, xv) in x.iter().enumerate() {
        unsafe { _mm512_storeu_si512(state.as_mut_ptr().add(16 * v).cast(), *xv) };
    }
    Some(pos)
}

/// The AVX2 decoder (for CPUs without AVX-512): 8 lanes per vector, eight
/// vectors per group of 64. Contexts of at most 16 symbols are searched in
/// two registers, others gathered; the words go to the lanes that need
/// them by a permutation from a table indexed by the 8-bit mask.
///
/// # Safety
/// The CPU must support AVX2 and POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn decode_avx2(t: &Tables, state: &mut [u32; LANES], words: &[u8], run: usize, out: &mut [u8]) -> Option<usize> {
    use std::arch::x86_64::*;
    const V: usize = LANES / 8;
    if run < 8 {
        return decode_scalar(t, state, words, run, out);
    }
    // for each mask of lanes that need a word, the index of the word each
    // lane takes (the number of needing lanes before it)
    const SPREAD: [[i32; 8]; 256] = {
        let mut table = [[0i32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let mut l = 0;
            while l < 8 {
                table[m][l] = (m & ((1 << l) - 1)).count_ones() as i32;
                l += 1;
            }
            m += 1;
        }
        table
    };
    let n = out.len();
    let mask12 = _mm256_set1_epi32(0xfff);
    let (bucket, entries) = (t.bucket.as_ptr(), t.entries.as_ptr());
    let end_of = |e: __m256i| _mm256_add_epi32(_mm256_and_si256(e, mask12), _mm256_and_si256(_mm256_srli_epi32::<12>(e), mask12));
    // lanes where `a >= b` for values below 2^31
    let ge = |a: __m256i, b: __m256i| _mm256_cmpgt_epi32(a, _mm256_sub_epi32(b, _mm256_set1_epi32(1)));
    // value `i` (0..16) of a 16-entry table held in two registers
    let pick = |lo: __m256i, hi: __m256i, i: __m256i| {
        let upper = _mm256_cmpgt_epi32(i, _mm256_set1_epi32(7));
        _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(lo, i), _mm256_permutevar8x32_epi32(hi, i), upper)
    };
    let search = |c: usize, slot: __m256i| {
        let (ends, ent) = (t.small_ends[c].as_ptr(), t.entries[c * 256..].as_ptr());
        // SAFETY: `small_ends[c]` holds 32 u32s, `entries` 256 per context.
        let (e0, e1, n0, n1) = unsafe {
            (
                _mm256_loadu_si256(ends.cast()),
                _mm256_loadu_si256(ends.add(8).cast()),
                _mm256_loadu_si256(ent.cast()),
                _mm256_loadu_si256(ent.add(8).cast()),
            )
        };
        let mut i = _mm256_setzero_si256();
        for stride in [8, 4, 2, 1] {
            let probe = pick(e0, e1, _mm256_add_epi32(i, _mm256_set1_epi32(stride - 1)));
            i = _mm256_add_epi32(i, _mm256_and_si256(ge(slot, probe), _mm256_set1_epi32(stride)));
        }
        pick(n0, n1, i)
    };
    // SAFETY (all loads and stores below): `state` holds LANES u32s; the
    // gathers read only active lanes (masked), whose context is below the
    // number of tables (checked by the caller), at bucket offsets below
    // 512 (+3 bytes of padding) and entry offsets below 256; the words are
    // read within `words` (checked first, the last ones through a copy).
    let mut x: [__m256i; V] = std::array::from_fn(|v| unsafe { _mm256_loadu_si256(state.as_ptr().add(8 * v).cast()) });
    let mut place: [(usize, usize); V] = std::array::from_fn(|v| (8 * v / run, 8 * v % run));
    let mut pos = 0usize;
    let mut j0 = 0usize;
    while j0 < n {
        for (v, (xv, place)) in x.iter_mut().zip(&mut place).enumerate() {
            let jv = j0 + 8 * v;
            if jv >= n {
                break;
            }
            let live = (n - jv).min(8);
            let active = _mm256_cmpgt_epi32(_mm256_set1_epi32(live as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let (ca, cb, split) = vector_contexts(place, live, run);
            // lanes in the second context (when there is one)
            let second = _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(split as i32 - 1));
            let slot = _mm256_and_si256(*xv, mask12);
            let e = if t.symbols[ca] <= 16 && t.symbols[cb] <= 16 {
                let e = search(ca, slot);
                if cb == ca { e } else { _mm256_blendv_epi8(e, search(cb, slot), second) }
            } else {
                let ctx = _mm256_blendv_epi8(_mm256_set1_epi32(ca as i32), _mm256_set1_epi32(cb as i32), second);
                let bidx = _mm256_add_epi32(_mm256_slli_epi32::<9>(ctx), _mm256_srli_epi32::<3>(slot));
                let b = unsafe { _mm256_mask_i32gather_epi32::<1>(_mm256_setzero_si256(), bucket.cast(), bidx, active) };
                let mut eidx = _mm256_add_epi32(_mm256_slli_epi32::<8>(ctx), _mm256_and_si256(b, _mm256_set1_epi32(255)));
                let mut e = unsafe { _mm256_mask_i32gather_epi32::<4>(_mm256_setzero_si256(), entries.cast(), eidx, active) };
                let mut past = _mm256_and_si256(active, ge(slot, end_of(e)));
                while _mm256_testz_si256(past, past) == 0 {
                    eidx = _mm256_sub_epi32(eidx, past);
                    e = unsafe { _mm256_mask_i32gather_epi32::<4>(e, entries.cast(), eidx, past) };
                    past = _mm256_and_si256(past, ge(slot, end_of(e)));
                }
                e
            };
            let freq = _mm256_and_si256(_mm256_srli_epi32::<12>(e), mask12);
            let start = _mm256_and_si256(e, mask12);
            let nx = _mm256_sub_epi32(_mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32::<12>(*xv)), slot), start);
            // the symbols' bytes: 32 -> 16 -> 8 bits
            let bytes = _mm256_srli_epi32::<24>(e);
            let b16 = _mm_packus_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256::<1>(bytes));
            let b8 = _mm_cvtsi128_si64(_mm_packus_epi16(b16, b16)).to_le_bytes();
            out[jv..jv + live].copy_from_slice(&b8[..live]);
            // lanes below 2^16 take the next words, in lane order
            let need = _mm256_and_si256(active, _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(nx), _mm256_setzero_si256()));
            let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
            let count = m.count_ones() as usize;
            if pos + 2 * count > words.len() {
                return None;
            }
            let loaded = if pos + 16 <= words.len() {
                unsafe { _mm_loadu_si128(words.as_ptr().add(pos).cast()) }
            } else {
                let mut tail = [0u8; 16];
                tail[..words.len() - pos].copy_from_slice(&words[pos..]);
                unsafe { _mm_loadu_si128(tail.as_ptr().cast()) }
            };
            let spread = unsafe { _mm256_loadu_si256(SPREAD[m].as_ptr().cast()) };
            let w = _mm256_permutevar8x32_epi32(_mm256_cvtepu16_epi32(loaded), spread);
            pos += 2 * count;
            let renormed = _mm256_blendv_epi8(nx, _mm256_or_si256(_mm256_slli_epi32::<16>(nx), w), need);
            *xv = _mm256_blendv_epi8(*xv, renormed, active);
        }
        j0 += LANES;
    }
    for (v, xv) in x.iter().enumerate() {
        unsafe { _mm256_storeu_si256(state.as_mut_ptr().add(8 * v).cast(), *xv) };
    }
    Some(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(contexts: usize, seed: u64) -> Tables {
        let mut s = seed | 1;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let freq = (0..contexts)
            .map(|c| {
                // a peaked distribution over a few bytes, an escape for the rest
                let mut f = [0u16; SYMBOLS];
                let width = 1 + c % 40;
                let mut left = M as u16 - 1;
                for k in 0..width {
                    let b = (k as i32 - width as i32 / 2).rem_euclid(256) as usize;
                    let share = if k + 1 == width { left } else { (left / 2).max(1) };
                    f[b] += share;
                    left -= share;
                    if left == 0 {
                        break;
                    }
                }
                f[ESC] = 1;
                let _ = rnd();
                f
            })
            .collect();
        Tables::new(freq).expect("valid tables")
    }

    fn symbols(t: &Tables, n: usize, seed: u64, run: usize) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|j| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = (s >> 33) as u32 % M;
                if r < 3 {
                    return 99; // rarely an escape
                }
                let f = t.freq(j / run);
                let mut acc = 0u32;
                (0..256)
                    .find(|&b| {
                        acc += u32::from(f[b]);
                        r < acc
                    })
                    .unwrap_or(0) as u8
            })
            .collect()
    }

    #[test]
    fn round_trips_on_every_path_and_odd_lengths() {
        for (run, contexts) in [(197, 24), (50, 30), (7, 60), (1, 300), (33, 9), (197, 384)] {
            let t = tables(contexts, 5);
            for n in [run * contexts, run * contexts - 1, 1, 31, 32, 33] {
                let n = n.min(run * contexts);
                let s = symbols(&t, n, n as u64, run);
                let mut rec = Vec::new();
                t.encode(&s, run, &mut rec);
                assert!(Some(rec.len() as u64) <= Tables::max_encoded_len(n as u64));
                let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
                assert!(t.decode(&rec, run, &mut a), "run {run} n {n}");
                assert!(t.decode_reference(&rec, run, &mut b), "run {run} n {n}");
                assert_eq!(a, s);
                assert_eq!(b, s);
                if let Some(ok) = t.decode_avx2(&rec, run, &mut a) {
                    assert!(ok, "avx2: run {run} n {n}");
                    assert_eq!(a, s);
                }
                // damage is refused by both
                let mut bad = rec.clone();
                bad.truncate(rec.len() - 2);
                assert!(!t.decode(&bad, run, &mut a) && !t.decode_reference(&bad, run, &mut b));
                let mut bad = rec.clone();
                bad[4] ^= 1;
                assert!(!t.decode(&bad, run, &mut a) && !t.decode_reference(&bad, run, &mut b));
            }
        }
    }

    /// Random bytes are refused the same way by both decoders, without
    /// reading out of bounds.
    #[test]
    fn garbage_is_refused_alike() {
        let (run, contexts) = (50, 40);
        let t = tables(contexts, 9);
        let n = run * contexts;
        let good = {
            let mut rec = Vec::new();
            t.encode(&symbols(&t, n, 1, run), run, &mut rec);
            rec
        };
        let mut s = 0x1234_5678_9abc_def0u64;
        for trial in 0..200 {
            let mut rec = good.clone();
            // damage a few bytes anywhere, sometimes the escape count
            for _ in 0..1 + trial % 4 {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let i = (s >> 33) as usize % rec.len();
                rec[i] = (s >> 17) as u8;
            }
            let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
            let (ra, rb) = (t.decode(&rec, run, &mut a), t.decode_reference(&rec, run, &mut b));
            assert_eq!(ra, rb, "trial {trial}");
            if ra {
                assert_eq!(a, b);
            }
            if let Some(rc) = t.decode_avx2(&rec, run, &mut a) {
                assert_eq!(rc, rb, "avx2: trial {trial}");
                if rc {
                    assert_eq!(a, b);
                }
            }
        }
    }
}
