/* What walsvc's two extension modules share, as static functions each compiles in: CRC32C, the record
 * walk, the APPEND check and the DATA frame header.  _record_c.c (codecs) and _writer_c.c (the writer's
 * store of one batch) include it; it is the C side of docs/FORMAT.md and docs/PROTOCOL.md. */

#ifndef WALSVC_C_CORE_H
#define WALSVC_C_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FLAG_TOMBSTONE 0x01
#define FLAG_TTL 0x02
#define FLAG_COMPRESSION_MASK 0x0C
#define FLAG_VERSION 0x10
#define KNOWN_FLAGS 0x1F

/* ---- CRC32C (Castagnoli): SSE4.2 instruction where the CPU has it, slicing-by-8 tables elsewhere ---- */

static uint32_t crc_table[8][256];

static void crc_init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t crc_soft(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        uint32_t lo = (uint32_t)w ^ crc, hi = (uint32_t)(w >> 32);
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
              crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
    return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* One crc32 instruction waits about three cycles for the one before it.  Long buffers are therefore taken
 * in blocks of three streams of CRC_LONG bytes, each with its own register, which the CPU runs side by side
 * (about three times the speed); the three registers are then joined.  Joining is linear algebra over GF(2):
 * moving a register past n zero bytes is a product with x^(8n) mod P (gf2_mul; CRC_LONG's power is computed
 * once, at import).  Reflected CRC32C polynomial: */
#define CRC_POLY 0x82f63b78u
#define CRC_LONG 8192
static uint32_t crc_long_shift;  /* x^(8 * CRC_LONG) mod P */

/* a * b mod P, both polynomials in the CRC's reflected bit order */
static uint32_t gf2_mul(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ CRC_POLY : b >> 1;
    }
    return p;
}

/* x^(8n) mod P: the operator that moves a CRC register past n zero bytes */
static uint32_t gf2_zeros(size_t n) {
    uint32_t result = 1u << 31, square = 1u << 30;  /* x^0, and x^1 */
    for (size_t bits = 8 * n; bits; bits >>= 1) {
        if (bits & 1) result = gf2_mul(square, result);
        square = gf2_mul(square, square);
    }
    return result;
}

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = ~crc;
    while (n >= 3 * CRC_LONG) {
        uint64_t c1 = 0, c2 = 0;
        for (const unsigned char *end = p + CRC_LONG; p < end; p += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, p, 8);
            memcpy(&w1, p + CRC_LONG, 8);
            memcpy(&w2, p + 2 * CRC_LONG, 8);
            c = __builtin_ia32_crc32di(c, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
        }
        c = gf2_mul(crc_long_shift, (uint32_t)c) ^ (uint32_t)c1;
        c = gf2_mul(crc_long_shift, (uint32_t)c) ^ (uint32_t)c2;
        p += 2 * CRC_LONG;
        n -= 3 * CRC_LONG;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}
#define HAVE_CRC_HW 1
#endif

static uint32_t (*crc32c_fn)(uint32_t, const unsigned char *, size_t) = crc_soft;

/* ---- varints: the same acceptance rule as record.decode_varint ---- */

/* Reads the varint at *pos; 0 on success, -1 on anything decode_varint would reject. */
static inline int read_varint(const unsigned char *buf, Py_ssize_t *pos, Py_ssize_t end, uint64_t *out) {
    Py_ssize_t p = *pos, start = p;
    uint64_t result = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (p >= end) return -1;
        unsigned char b = buf[p++];
        if (shift == 63 && (b & 0x7F) > 1) return -1; /* would exceed 64 bits */
        result |= (uint64_t)(b & 0x7F) << shift;
        if (b < 0x80) {
            if (b == 0 && p - start > 1) return -1; /* over-long */
            *pos = p;
            *out = result;
            return 0;
        }
    }
    return -1;
}

typedef struct {
    Py_ssize_t start, key, value, vend; /* offsets: record, key, value, end of value (CRC follows) */
    uint64_t ttl, term, index;
    unsigned char flags;
} header_t;

/* Parses one record's header at `pos` and, if `check_crc`, its CRC; 0 if valid, -1 otherwise.  Readers pass
 * check_crc=0 inside a frame whose CRC already covered the bytes, as record.decode_payload does. */
static inline int read_record(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, uint64_t max_bytes,
                              header_t *h, int check_crc) {
    uint64_t kl, vl;
    h->start = pos;
    if (pos + 3 <= end && buf[pos] < 0x80 && buf[pos + 1] < 0x80) {
        kl = buf[pos];
        vl = buf[pos + 1];
        pos += 2;
    } else if (read_varint(buf, &pos, end, &kl) || read_varint(buf, &pos, end, &vl)) {
        return -1;
    }
    if (pos >= end) return -1;
    if (kl > max_bytes || vl > max_bytes || kl + vl > max_bytes) return -1;
    h->flags = buf[pos++];
    if ((h->flags & ~KNOWN_FLAGS) || (h->flags & FLAG_COMPRESSION_MASK) == FLAG_COMPRESSION_MASK) return -1;
    if ((h->flags & FLAG_TTL) && read_varint(buf, &pos, end, &h->ttl)) return -1;
    if ((h->flags & FLAG_VERSION) && (read_varint(buf, &pos, end, &h->term) || read_varint(buf, &pos, end, &h->index)))
        return -1;
    if ((uint64_t)(end - pos) < kl + vl + 4) return -1;
    h->key = pos;
    h->value = pos + (Py_ssize_t)kl;
    h->vend = h->value + (Py_ssize_t)vl;
    if (!check_crc) return 0;
    uint32_t stored;
    memcpy(&stored, buf + h->vend, 4); /* little-endian hosts only: checked at import */
    return crc32c_fn(0, buf + h->start, (size_t)(h->vend - h->start)) == stored ? 0 : -1;
}

/* Choose the CRC32C implementation for this CPU (each extension module calls it once, at import): its name. */
static const char *c_core_init(void) {
    crc_init_tables();
#ifdef HAVE_CRC_HW
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc_long_shift = gf2_zeros(CRC_LONG);
        crc32c_fn = crc_hw;
        return "sse4.2";
    }
#endif
    return "soft";
}

/* ---- fixed-width fields, APPEND messages and DATA frame headers ---- */

static inline uint64_t get_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t get_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* 0 when buf[0:len] is an APPEND check_append takes (its fields in *pid, *seq, *count), else -1. */
static int parse_append(const unsigned char *buf, Py_ssize_t len, unsigned long long max_record,
                        unsigned long long max_batch, uint64_t *pid, uint64_t *seq, uint32_t *count) {
    if (len < 28 || buf[0] != 'W' || buf[1] != 'S' || buf[2] != 1 || buf[3] != 1 || get_u32(buf + 24) != 0)
        return -1;
    *pid = get_u64(buf + 4);
    *seq = get_u64(buf + 12);
    *count = get_u32(buf + 20);
    if (*pid == 0 || *seq == 0 || *count == 0 || (unsigned long long)(len - 28) > max_batch) return -1;
    uint64_t n = 0;
    header_t h;
    for (Py_ssize_t pos = 28; pos < len; pos = h.vend + 4, n++)
        if (read_record(buf, pos, len, max_record, &h, 1) || (h.flags & FLAG_COMPRESSION_MASK)) return -1;
    return n == *count ? 0 : -1;
}

/* Lay out in `out` the header of the DATA frame carrying payload[0:len] (docs/FORMAT.md, "Frames"); returns
 * `data_crc` (the segment's running CRC) continued over the header and the payload. */
static uint32_t build_data_header(unsigned char *out, const unsigned char *payload, uint32_t len, uint32_t count,
                                  uint64_t base, uint64_t ts, uint64_t pid, uint64_t seq, uint32_t data_crc) {
    uint64_t v[4] = {base, ts, pid, seq};
    memcpy(out, "\x8bWF\x01", 4);
    out[4] = 1;  /* KIND_DATA */
    memset(out + 5, 0, 3);
    memcpy(out + 8, &len, 4);
    memcpy(out + 12, &count, 4);
    memcpy(out + 16, v, 32);
    uint32_t u32 = crc32c_fn(0, payload, len);
    memcpy(out + 48, &u32, 4);
    u32 = crc32c_fn(0, out, 52);
    memcpy(out + 52, &u32, 4);
    return crc32c_fn(crc32c_fn(data_crc, out, 56), payload, len);
}

/* An instance of the tuple subclass `cls` (a NamedTuple) holding `n` new references from `items`, as
 * tuple.__new__ builds one; NULL with an exception if cls is not a tuple subclass or an item is NULL. */
static PyObject *new_tuple_of(PyObject *cls, PyObject **items, Py_ssize_t n) {
    PyObject *obj = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!items[i]) goto done;
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "expected a tuple subclass");
        goto done;
    }
    obj = ((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls, n);
    if (!obj) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyTuple_SET_ITEM(obj, i, items[i]);
        items[i] = NULL;
    }
done:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
    return obj;
}

#endif
