/* The codecs' hot loops in C: the compiled twin of pure-Python functions in walsvc/record.py, and of the
 * per-batch codecs the writer, a producer and a tailing reader run (frame headers in frame.py, HEAD in head.py,
 * the writer's check of an APPEND in ingest.py, a REPLY in protocol.py).
 *
 * The Python functions are the reference.  Each function here accepts exactly the inputs its Python twin
 * accepts and produces the same result; on anything it does not take in stride (an error of any kind, a compressed
 * value, a non-bytes argument) it returns None and the caller runs the Python twin, which raises the
 * documented error or handles the rare case.  So errors have one implementation, and differential tests
 * (tests/test_record_fast.py, tests/test_codec_twins.py) hold the two to one behaviour.
 *
 * Record layout (nori-wal v1, docs/FORMAT.md):
 *   varint klen | varint vlen | u8 flags | [varint ttl_ms] | [varint term, varint index] | key | value | u32le crc32c
 */

#include "_c_core.h"
#include <structmember.h>

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t pos, Py_ssize_t *end) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) return -1;
    if (*end < 0 || *end > view->len) *end = view->len;
    if (pos < 0 || pos > *end) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "position outside the buffer");
        return -1;
    }
    return 0;
}

/* count_records(buf, pos, end, max_record_bytes) -> (n, compressed) | None
 * compressed: None, or a list of (record offset from pos, key start, value start, value end, code) for the
 * caller to check (record.py decides whether a compressed value is valid). */
static PyObject *count_records(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *obj;
    Py_ssize_t pos, end;
    unsigned long long max_bytes;
    if (!PyArg_ParseTuple(args, "OnnK", &obj, &pos, &end, &max_bytes)) return NULL;
    Py_buffer view;
    if (get_buffer(obj, &view, pos, &end) < 0) return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t n = 0, base = pos;
    PyObject *compressed = NULL;
    header_t h;
    while (pos < end) {
        if (read_record(buf, pos, end, max_bytes, &h, 1)) goto invalid;
        if (h.flags & FLAG_COMPRESSION_MASK) {
            if (!compressed && !(compressed = PyList_New(0))) goto fail;
            PyObject *span = Py_BuildValue("(nnnni)", h.start - base, h.key, h.value, h.vend,
                                           (h.flags & FLAG_COMPRESSION_MASK) >> 2);
            if (!span || PyList_Append(compressed, span) < 0) {
                Py_XDECREF(span);
                goto fail;
            }
            Py_DECREF(span);
        }
        pos = h.vend + 4;
        n++;
    }
    PyBuffer_Release(&view);
    if (!compressed) {
        compressed = Py_None;
        Py_INCREF(Py_None);
    }
    return Py_BuildValue("(nN)", n, compressed);
invalid:
    PyBuffer_Release(&view);
    Py_XDECREF(compressed);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(compressed);
    return NULL;
}

/* ---- building Record objects: the Python class's slots, written directly ---- */

enum { F_KEY, F_VALUE, F_TOMBSTONE, F_TTL, F_COMPRESSION, F_VERSION, F_LSN, F_TIMESTAMP, N_FIELDS };
static const char *field_names[N_FIELDS] = {"key", "value", "tombstone", "ttl_ms", "compression", "version", "lsn",
                                            "timestamp"};
static PyTypeObject *record_type = NULL;
static Py_ssize_t field_offset[N_FIELDS];

/* bind_record(Record): learn where the class keeps each slot.  Refuses a class that is not laid out as plain
 * object slots, so the fast path is used only where writing the slots directly is what setattr would do. */
static PyObject *bind_record(PyObject *Py_UNUSED(self), PyObject *cls) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "bind_record takes the Record class");
        return NULL;
    }
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *descr = PyObject_GetAttrString(cls, field_names[i]);
        if (!descr) return NULL;
        if (Py_TYPE(descr) != &PyMemberDescr_Type || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(descr);
            PyErr_Format(PyExc_TypeError, "Record.%s is not a plain slot", field_names[i]);
            return NULL;
        }
        field_offset[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
    }
    Py_INCREF(cls);
    Py_XSETREF(record_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

static inline void set_field(PyObject *obj, int field, PyObject *value) {
    /* `value` is a new reference the slot takes over; the slot is empty in a fresh object. */
    *(PyObject **)((char *)obj + field_offset[field]) = value;
}

static PyObject *new_record(const unsigned char *buf, const header_t *h, PyObject *lsn, PyObject *timestamp) {
    PyObject *rec = record_type->tp_alloc(record_type, 0);
    if (!rec) return NULL;
    /* Out of the cycle collector, as CPython does with a tuple of atomic values: the fields below are
     * bytes, ints, None, a bool and a tuple of ints, so the record cannot be part of a cycle.  The class
     * (record._ReadRecord) tracks it again before any field is set from Python.  Left tracked, a replay's
     * records age through the collector's generations and trigger full collections over and over. */
    PyObject_GC_UnTrack(rec);
    PyObject *key = PyBytes_FromStringAndSize((const char *)buf + h->key, h->value - h->key);
    PyObject *value = key ? PyBytes_FromStringAndSize((const char *)buf + h->value, h->vend - h->value) : NULL;
    PyObject *ttl = Py_None, *version = Py_None;
    if (!value) goto fail;
    if (h->flags & FLAG_TTL) {
        if (!(ttl = PyLong_FromUnsignedLongLong(h->ttl))) goto fail;
    } else {
        Py_INCREF(ttl);
    }
    if (h->flags & FLAG_VERSION) {
        if (!(version = Py_BuildValue("(KK)", (unsigned long long)h->term, (unsigned long long)h->index))) {
            Py_DECREF(ttl);
            goto fail;
        }
    } else {
        Py_INCREF(version);
    }
    PyObject *tomb = (h->flags & FLAG_TOMBSTONE) ? Py_True : Py_False;
    Py_INCREF(tomb);
    Py_INCREF(Py_None);
    Py_INCREF(timestamp);
    set_field(rec, F_KEY, key);
    set_field(rec, F_VALUE, value);
    set_field(rec, F_TOMBSTONE, tomb);
    set_field(rec, F_TTL, ttl);
    set_field(rec, F_COMPRESSION, Py_None);
    set_field(rec, F_VERSION, version);
    set_field(rec, F_LSN, lsn);
    set_field(rec, F_TIMESTAMP, timestamp);
    return rec;
fail:
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_DECREF(rec);
    return NULL;
}

/* The records of buf[pos:end], numbered from base_lsn, those from first_wanted on, appended to `out`:
 * 0; 1 for a payload this twin does not decode (a compressed value, a fault, a count that is not `count`);
 * -1 with an exception set. */
static int decode_records(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, long long base_lsn,
                          long long count, PyObject *timestamp, long long first_wanted, uint64_t max_bytes,
                          PyObject *out) {
    long long lsn = base_lsn;
    header_t h;
    while (pos < end) {
        if (read_record(buf, pos, end, max_bytes, &h, 0) || (h.flags & FLAG_COMPRESSION_MASK)) return 1;
        if (lsn >= first_wanted) {
            PyObject *lsn_obj = PyLong_FromLongLong(lsn);
            PyObject *rec = lsn_obj ? new_record(buf, &h, lsn_obj, timestamp) : NULL;
            if (!rec) {
                Py_XDECREF(lsn_obj);
                return -1;
            }
            int failed = PyList_Append(out, rec);
            Py_DECREF(rec);
            if (failed) return -1;
        }
        pos = h.vend + 4;
        lsn++;
    }
    return lsn - base_lsn == count ? 0 : 1;
}

static int record_type_bound(void) {
    if (record_type) return 1;
    PyErr_SetString(PyExc_RuntimeError, "bind_record was not called");
    return 0;
}

/* decode_payload(buf, base_lsn, count, timestamp, first_wanted, start, end, max_record_bytes) -> list | None
 * None for a payload with a compressed value or any fault: the Python twin then decodes (or raises). */
static PyObject *decode_payload(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *obj, *timestamp;
    long long base_lsn, count, first_wanted;
    Py_ssize_t pos, end;
    unsigned long long max_bytes;
    if (!PyArg_ParseTuple(args, "OLLOLnnK", &obj, &base_lsn, &count, &timestamp, &first_wanted, &pos, &end,
                          &max_bytes))
        return NULL;
    if (!record_type_bound()) return NULL;
    Py_buffer view;
    if (get_buffer(obj, &view, pos, &end) < 0) return NULL;
    PyObject *out = PyList_New(0);
    int rc = out ? decode_records(view.buf, pos, end, base_lsn, count, timestamp, first_wanted, max_bytes, out) : -1;
    PyBuffer_Release(&view);
    if (rc == 0) return out;
    Py_XDECREF(out);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

/* ---- encoding plain puts ---- */

static inline Py_ssize_t varint_len(uint64_t n) {
    Py_ssize_t len = 1;
    while (n >= 0x80) {
        n >>= 7;
        len++;
    }
    return len;
}

static inline unsigned char *write_varint(unsigned char *p, uint64_t n) {
    while (n >= 0x80) {
        *p++ = (unsigned char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    *p++ = (unsigned char)n;
    return p;
}

static unsigned char *write_put(unsigned char *p, const char *key, Py_ssize_t kl, const char *value, Py_ssize_t vl) {
    unsigned char *start = p;
    p = write_varint(p, (uint64_t)kl);
    p = write_varint(p, (uint64_t)vl);
    *p++ = 0;
    memcpy(p, key, (size_t)kl);
    p += kl;
    memcpy(p, value, (size_t)vl);
    p += vl;
    uint32_t crc = crc32c_fn(0, start, (size_t)(p - start));
    memcpy(p, &crc, 4);
    return p + 4;
}

/* encode_puts(items, max_record_bytes) -> bytes | None: plain puts laid end to end, for a list or tuple of
 * (key, value) pairs of bytes.  None for anything else (str, other types, a record over the limit). */
static PyObject *encode_puts(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *items;
    unsigned long long max_bytes;
    if (!PyArg_ParseTuple(args, "OK", &items, &max_bytes)) return NULL;
    PyObject *seq = PySequence_Fast(items, "items must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), total = 0;
    PyObject **pairs = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = pairs[i];
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 1)))
            goto decline;
        Py_ssize_t kl = PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0)), vl = PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1));
        if ((unsigned long long)kl + (unsigned long long)vl > max_bytes) goto decline;
        total += varint_len((uint64_t)kl) + varint_len((uint64_t)vl) + 1 + kl + vl + 4;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) {
        Py_DECREF(seq);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PyTuple_GET_ITEM(pairs[i], 0), *v = PyTuple_GET_ITEM(pairs[i], 1);
        p = write_put(p, PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k), PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    }
    Py_DECREF(seq);
    return out;
decline:
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* encode_put(key, value) -> bytes: one plain put; the caller has checked both are bytes. */
static PyObject *encode_put(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "encode_put takes two bytes objects");
        return NULL;
    }
    Py_ssize_t kl = PyBytes_GET_SIZE(args[0]), vl = PyBytes_GET_SIZE(args[1]);
    PyObject *out = PyBytes_FromStringAndSize(NULL, varint_len((uint64_t)kl) + varint_len((uint64_t)vl) + 1 + kl + vl + 4);
    if (!out) return NULL;
    write_put((unsigned char *)PyBytes_AS_STRING(out), PyBytes_AS_STRING(args[0]), kl, PyBytes_AS_STRING(args[1]), vl);
    return out;
}

/* ---- PutBuffer: the open batch of a producer, plain puts encoded straight into it ---- */

/* Each put appends its record to one growing buffer and returns a handle: an instance of the class given at
 * construction (walsvc.producer.RecordFuture) with its `_batch` and `_index` slots written directly.  The
 * whole of `put` runs with the GIL held and calls no Python code after its one allocation that can collect
 * garbage, so it is atomic for the producer's threads: no lock per record (the producer's lock still guards
 * opening and closing, done by `open`, `add` and `take`).  On anything but the common case (not exact
 * bytes, over max_record_bytes, no open batch, no room under `limit`) it returns None, and the producer takes
 * its locked path.  record.PutBufferPy is the reference. */

typedef struct {
    PyObject_HEAD
    unsigned char *buf;
    Py_ssize_t size, cap, count, limit;
    unsigned long long max_bytes;
    PyObject *owner;        /* the open batch's token (handles point at it); NULL while closed */
    PyTypeObject *handle_type;
    Py_ssize_t off_batch, off_index;
} PutBuffer;

static int slot_offset(PyObject *cls, const char *name, Py_ssize_t *offset) {
    PyObject *descr = PyObject_GetAttrString(cls, name);
    if (!descr) return -1;
    if (Py_TYPE(descr) != &PyMemberDescr_Type || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        Py_DECREF(descr);
        PyErr_Format(PyExc_TypeError, "%s is not a plain slot of the handle class", name);
        return -1;
    }
    *offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    return 0;
}

static int putbuffer_init(PutBuffer *self, PyObject *args, PyObject *kwds) {
    PyObject *cls;
    unsigned long long max_bytes;
    static char *kwlist[] = {"handle_type", "max_record_bytes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OK", kwlist, &cls, &max_bytes)) return -1;
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "handle_type must be a class");
        return -1;
    }
    if (slot_offset(cls, "_batch", &self->off_batch) < 0 || slot_offset(cls, "_index", &self->off_index) < 0) return -1;
    Py_INCREF(cls);
    Py_XSETREF(self->handle_type, (PyTypeObject *)cls);
    self->max_bytes = max_bytes;
    return 0;
}

static void putbuffer_dealloc(PutBuffer *self) {
    PyMem_Free(self->buf);
    Py_XDECREF(self->owner);
    Py_XDECREF(self->handle_type);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int putbuffer_reserve(PutBuffer *self, Py_ssize_t more) {
    if (self->size + more <= self->cap) return 0;
    Py_ssize_t cap = self->cap ? self->cap : 4096;
    while (cap < self->size + more) cap *= 2;
    unsigned char *grown = PyMem_Realloc(self->buf, (size_t)cap); /* no garbage collection in here */
    if (!grown) {
        PyErr_NoMemory();
        return -1;
    }
    self->buf = grown;
    self->cap = cap;
    return 0;
}

static PyObject *putbuffer_handle(PutBuffer *self, PyObject *handle, PyObject *owner, Py_ssize_t index) {
    PyObject *index_obj = PyLong_FromSsize_t(index);
    if (!index_obj) {
        Py_DECREF(handle);
        return NULL;
    }
    Py_INCREF(owner);
    *(PyObject **)((char *)handle + self->off_batch) = owner;
    *(PyObject **)((char *)handle + self->off_index) = index_obj;
    return handle;
}

/* put(key, value) -> handle | None */
static PyObject *putbuffer_put(PutBuffer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "put takes a key and a value");
        return NULL;
    }
    PyObject *key = args[0], *value = args[1];
    if (!PyBytes_CheckExact(key) || !PyBytes_CheckExact(value) || !self->owner) Py_RETURN_NONE;
    Py_ssize_t kl = PyBytes_GET_SIZE(key), vl = PyBytes_GET_SIZE(value);
    if ((unsigned long long)kl + (unsigned long long)vl > self->max_bytes) Py_RETURN_NONE;
    Py_ssize_t n = varint_len((uint64_t)kl) + varint_len((uint64_t)vl) + 1 + kl + vl + 4;
    if (self->size + n >= self->limit) Py_RETURN_NONE;
    /* The one allocation that may collect garbage (and so run other threads) comes first; the state is
     * looked at again after it. */
    PyObject *handle = self->handle_type->tp_alloc(self->handle_type, 0);
    if (!handle) return NULL;
    if (!self->owner || self->size + n >= self->limit) {
        Py_DECREF(handle);
        Py_RETURN_NONE;
    }
    if (putbuffer_reserve(self, n) < 0) {
        Py_DECREF(handle);
        return NULL;
    }
    write_put(self->buf + self->size, PyBytes_AS_STRING(key), kl, PyBytes_AS_STRING(value), vl);
    self->size += n;
    return putbuffer_handle(self, handle, self->owner, self->count++);
}

/* open(owner, limit): start a batch; puts are taken while size + record < limit. */
static PyObject *putbuffer_open(PutBuffer *self, PyObject *args) {
    PyObject *owner;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "On", &owner, &limit)) return NULL;
    if (!self->handle_type) {
        PyErr_SetString(PyExc_ValueError, "PutBuffer was not initialised");
        return NULL;
    }
    if (self->owner) {
        PyErr_SetString(PyExc_ValueError, "a batch is already open");
        return NULL;
    }
    Py_INCREF(owner);
    self->owner = owner;
    self->size = self->count = 0;
    self->limit = limit;
    Py_RETURN_NONE;
}

/* add(data, count) -> index of the first of `count` records already encoded end to end in `data` */
static PyObject *putbuffer_add(PutBuffer *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "y*n", &view, &count)) return NULL;
    if (!self->owner) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "no batch is open");
        return NULL;
    }
    if (putbuffer_reserve(self, view.len) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    memcpy(self->buf + self->size, view.buf, (size_t)view.len);
    self->size += view.len;
    PyBuffer_Release(&view);
    Py_ssize_t first = self->count;
    self->count += count;
    return PyLong_FromSsize_t(first);
}

/* take() -> (payload, count): close the batch. */
static PyObject *putbuffer_take(PutBuffer *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->owner) {
        PyErr_SetString(PyExc_ValueError, "no batch is open");
        return NULL;
    }
    /* The bytes object is not garbage-collected, so making it runs no other thread: the batch is closed
     * before anything that may (building the tuple, dropping the owner). */
    PyObject *payload = PyBytes_FromStringAndSize((const char *)self->buf, self->size);
    if (!payload) return NULL;
    Py_ssize_t count = self->count;
    PyObject *owner = self->owner;
    self->owner = NULL;
    self->size = self->count = 0;
    if (self->cap > (1 << 20)) { /* an oversized batch: do not keep its buffer */
        PyMem_Free(self->buf);
        self->buf = NULL;
        self->cap = 0;
    }
    PyObject *out = Py_BuildValue("(Nn)", payload, count);
    Py_DECREF(owner);
    return out;
}

/* handles(owner, first, n) -> [handle(owner, first), ..., handle(owner, first + n - 1)] */
static PyObject *putbuffer_handles(PutBuffer *self, PyObject *args) {
    PyObject *owner;
    Py_ssize_t first, n;
    if (!PyArg_ParseTuple(args, "Onn", &owner, &first, &n)) return NULL;
    if (!self->handle_type) {
        PyErr_SetString(PyExc_ValueError, "PutBuffer was not initialised");
        return NULL;
    }
    PyObject *out = PyList_New(n < 0 ? 0 : n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *handle = self->handle_type->tp_alloc(self->handle_type, 0);
        if (!handle || !(handle = putbuffer_handle(self, handle, owner, first + i))) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, handle);
    }
    return out;
}

static PyObject *putbuffer_is_open(PutBuffer *self, void *Py_UNUSED(closure)) { return PyBool_FromLong(self->owner != NULL); }

static PyMethodDef putbuffer_methods[] = {
    {"put", (PyCFunction)(void (*)(void))putbuffer_put, METH_FASTCALL, "Append a plain put: its handle, or None."},
    {"open", (PyCFunction)putbuffer_open, METH_VARARGS, "Start a batch for owner, taking puts below limit."},
    {"add", (PyCFunction)putbuffer_add, METH_VARARGS, "Append encoded records: the first one's index."},
    {"take", (PyCFunction)putbuffer_take, METH_NOARGS, "Close the batch: (payload, count)."},
    {"handles", (PyCFunction)putbuffer_handles, METH_VARARGS, "Handles for n records of owner from first."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef putbuffer_members[] = {
    {"size", T_PYSSIZET, offsetof(PutBuffer, size), READONLY, "Bytes in the open batch."},
    {"count", T_PYSSIZET, offsetof(PutBuffer, count), READONLY, "Records in the open batch."},
    {"limit", T_PYSSIZET, offsetof(PutBuffer, limit), 0, "put takes a record while size + its bytes < limit."},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *putbuffer_atomic(PutBuffer *self, void *Py_UNUSED(closure)) { Py_RETURN_TRUE; }

static PyGetSetDef putbuffer_getset[] = {
    {"is_open", (getter)putbuffer_is_open, NULL, "Whether a batch is open.", NULL},
    {"atomic", (getter)putbuffer_atomic, NULL, "put needs no lock (it runs whole under the GIL).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PutBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "walsvc._record_c.PutBuffer",
    .tp_basicsize = sizeof(PutBuffer),
    .tp_dealloc = (destructor)putbuffer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A producer's open batch: plain puts encoded into one buffer, one handle each.",
    .tp_methods = putbuffer_methods,
    .tp_members = putbuffer_members,
    .tp_getset = putbuffer_getset,
    .tp_init = (initproc)putbuffer_init,
    .tp_new = PyType_GenericNew,
};

/* gc_track(obj): put an object the decoder left out of the cycle collector back in (before a field is set). */
static PyObject *gc_track(PyObject *Py_UNUSED(self), PyObject *obj) {
    if (!PyObject_IS_GC(obj)) {
        PyErr_SetString(PyExc_TypeError, "gc_track takes an object of a garbage-collected type");
        return NULL;
    }
    if (!PyObject_GC_IsTracked(obj)) PyObject_GC_Track(obj);
    Py_RETURN_NONE;
}

/* ---- the writer's per-batch codecs: an APPEND message checked whole, a frame header, a HEAD ---- */

/* check_append(msg, max_record_bytes, max_batch_bytes) -> (producer id, seq, payload, count) | None
 * The twin of ingest.IngestSession's checks for a message it would store: a well-formed APPEND header
 * (protocol.decode_append) whose payload fits max_batch_bytes and holds exactly `count` valid records, none
 * compressed (record.count_records).  Anything else, the caller's Python decides (and names the refusal). */
static PyObject *check_append(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *obj;
    unsigned long long max_record, max_batch;
    if (!PyArg_ParseTuple(args, "OKK", &obj, &max_record, &max_batch)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t pid, seq;
    uint32_t count;
    PyObject *result = Py_None;
    if (parse_append(view.buf, view.len, max_record, max_batch, &pid, &seq, &count) == 0)
        result = Py_BuildValue("(KKy#I)", (unsigned long long)pid, (unsigned long long)seq,
                               (const char *)view.buf + 28, view.len - 28, count);
    else
        Py_INCREF(result);
    PyBuffer_Release(&view);
    return result;
}

/* Exactly `n` Python ints, the i-th an unsigned integer of bits[i] bits, into `out`: 0; -1 (error cleared)
 * when one is not an int or out of range (the caller declines); -2 (TypeError set) for a wrong count. */
static int get_uints(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, const int *bits, uint64_t *out,
                     const char *name) {
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, n);
        return -2;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (!PyLong_CheckExact(args[i])) return -1;
        unsigned long long v = PyLong_AsUnsignedLongLong(args[i]);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        if (bits[i] < 64 && v >> bits[i]) return -1;
        out[i] = v;
    }
    return 0;
}

/* frame_header(kind, payload len, count, base LSN, ts µs, producer id, producer seq, payload crc) -> bytes | None
 * The twin of frame.encode_frame_header_py (docs/FORMAT.md, "Frames"); None for an argument out of range. */
static PyObject *frame_header(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    static const int bits[8] = {8, 32, 32, 64, 64, 64, 64, 32};
    uint64_t v[8];
    int got = get_uints(args, nargs, 8, bits, v, "frame_header");
    if (got == -2) return NULL;
    if (got < 0) Py_RETURN_NONE;
    unsigned char out[56];
    memcpy(out, "\x8bWF\x01", 4);
    out[4] = (unsigned char)v[0];
    out[5] = 0;
    memset(out + 6, 0, 2);
    uint32_t u32 = (uint32_t)v[1];
    memcpy(out + 8, &u32, 4);
    u32 = (uint32_t)v[2];
    memcpy(out + 12, &u32, 4);
    for (int i = 0; i < 4; i++) memcpy(out + 16 + 8 * i, &v[3 + i], 8);
    u32 = (uint32_t)v[7];
    memcpy(out + 48, &u32, 4);
    u32 = crc32c_fn(0, out, 52);
    memcpy(out + 52, &u32, 4);
    return PyBytes_FromStringAndSize((const char *)out, 56);
}

/* data_frame_header(payload, count, base LSN, ts µs, producer id, producer seq, data crc) -> (header, data crc)
 * | None.  The twin of frame.data_frame_header_py: the header of the DATA frame carrying `payload` (its CRC
 * taken here), and the segment's running data CRC continued over header and payload, where the Python
 * makes six calls per batch.  None for an argument out of range or a payload that is not bytes. */
static PyObject *data_frame_header(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    static const int bits[6] = {32, 64, 64, 64, 64, 32};
    uint64_t v[6];
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "data_frame_header takes 7 arguments");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0]) || get_uints(args + 1, 6, 6, bits, v, "data_frame_header") < 0)
        Py_RETURN_NONE;
    const unsigned char *payload = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t len = PyBytes_GET_SIZE(args[0]);
    if ((uint64_t)len >> 32) Py_RETURN_NONE;
    unsigned char out[56];
    uint32_t data_crc = build_data_header(out, payload, (uint32_t)len, (uint32_t)v[0], v[1], v[2], v[3], v[4],
                                          (uint32_t)v[5]);
    PyObject *header = PyBytes_FromStringAndSize((const char *)out, 56);
    if (header == NULL) return NULL;
    return Py_BuildValue("(NI)", header, data_crc);
}

/* head(committed LSN, writer pid, active base LSN, active end, durable LSN) -> bytes | None
 * The twin of head.encode_py (docs/FORMAT.md, "HEAD"); None for an argument out of range. */
static PyObject *head(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    static const int bits[5] = {64, 64, 64, 64, 64};
    uint64_t v[5];
    int got = get_uints(args, nargs, 5, bits, v, "head");
    if (got == -2) return NULL;
    if (got < 0) Py_RETURN_NONE;
    unsigned char out[52];
    memcpy(out, "WALSVCHD", 8);
    for (int i = 0; i < 5; i++) memcpy(out + 8 + 8 * i, &v[i], 8);
    uint32_t crc = crc32c_fn(0, out, 48);
    memcpy(out + 48, &crc, 4);
    return PyBytes_FromStringAndSize((const char *)out, 52);
}

/* A frame header at p (`avail` bytes there) with its magic, zero flags and reserved bytes, and its CRC; the
 * kind is the caller's to check. */
static inline int frame_header_valid(const unsigned char *p, Py_ssize_t avail) {
    return avail >= 56 && memcmp(p, "\x8bWF\x01", 4) == 0 && !p[5] && !p[6] && !p[7] &&
           crc32c_fn(0, p, 52) == get_u32(p + 52);
}

/* decode_frame_header(cls, buf, pos) -> cls(kind, payload len, count, base LSN, ts µs, producer id, seq,
 * payload crc) | None: the twin of frame.decode_frame_header_py for a header it would accept; None for
 * anything else (the reference names the error). */
static PyObject *decode_frame_header(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *cls, *obj;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "OOn", &cls, &obj, &pos)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = (const unsigned char *)view.buf + pos;
    if (pos < 0 || !frame_header_valid(p, view.len - pos) || (p[4] != 1 && p[4] != 2)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *items[8] = {
        PyLong_FromLong(p[4]), PyLong_FromUnsignedLong(get_u32(p + 8)), PyLong_FromUnsignedLong(get_u32(p + 12)),
        PyLong_FromUnsignedLongLong(get_u64(p + 16)), PyLong_FromUnsignedLongLong(get_u64(p + 24)),
        PyLong_FromUnsignedLongLong(get_u64(p + 32)), PyLong_FromUnsignedLongLong(get_u64(p + 40)),
        PyLong_FromUnsignedLong(get_u32(p + 48))};
    PyBuffer_Release(&view);
    return new_tuple_of(cls, items, 8);
}

/* data_frame(buf, pos, end, next_lsn, bound, max_record_bytes[, min_base]) -> (records, frame size, end LSN,
 * payload length) | None.  A tailing reader's step (segment.FrameScanner.take_data_frame) in one call: the DATA
 * frame at buf[pos:] when it lies whole before `end`, passes its header and payload CRCs, starts at or below
 * `bound` (-1: none) and at or above `min_base` (default 0), ends past `next_lsn` and decodes with no
 * compressed value; its records from `next_lsn` on.
 * None for anything else: the Python scan then decides (a seal, a torn or damaged frame, one past the bound,
 * one the buffer does not hold whole) and names any fault. */
static PyObject *data_frame(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *obj;
    Py_ssize_t pos, end;
    long long next_lsn, bound;
    unsigned long long max_bytes, min_base = 0;
    if (!PyArg_ParseTuple(args, "OnnLLK|K", &obj, &pos, &end, &next_lsn, &bound, &max_bytes, &min_base)) return NULL;
    if (!record_type_bound()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    if (end > view.len) end = view.len;
    const unsigned char *p = (const unsigned char *)view.buf + pos;
    PyObject *records = NULL, *timestamp = NULL, *result = NULL;
    if (pos < 0 || !frame_header_valid(p, end - pos) || p[4] != 1) goto decline;
    uint32_t payload_len = get_u32(p + 8), count = get_u32(p + 12);
    uint64_t base = get_u64(p + 16), end_lsn = base + count;
    if ((uint64_t)(end - pos - 56) < payload_len || base > (uint64_t)LLONG_MAX - count || next_lsn < 0 ||
        end_lsn <= (uint64_t)next_lsn || base < min_base || (bound >= 0 && base > (uint64_t)bound) ||
        crc32c_fn(0, p + 56, payload_len) != get_u32(p + 48))
        goto decline;
    if (!(records = PyList_New(0)) || !(timestamp = PyLong_FromUnsignedLongLong(get_u64(p + 24)))) goto fail;
    int rc = decode_records(view.buf, pos + 56, pos + 56 + (Py_ssize_t)payload_len, (long long)base, count,
                            timestamp, next_lsn, max_bytes, records);
    if (rc < 0) goto fail;
    if (rc > 0) goto decline;
    result = Py_BuildValue("(OnKI)", records, (Py_ssize_t)56 + (Py_ssize_t)payload_len,
                           (unsigned long long)end_lsn, payload_len);
fail:
    Py_XDECREF(records);
    Py_XDECREF(timestamp);
    PyBuffer_Release(&view);
    return result;
decline:
    Py_XDECREF(records);
    Py_XDECREF(timestamp);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* decode_head(cls, data) -> cls(committed LSN, writer pid, active base LSN, active end, durable LSN) | None:
 * the twin of head.decode_py for a HEAD it would accept; None for anything else. */
static PyObject *decode_head(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *cls, *obj;
    if (!PyArg_ParseTuple(args, "OO", &cls, &obj)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = view.buf;
    if (view.len < 52 || memcmp(p, "WALSVCHD", 8) != 0 || crc32c_fn(0, p, 48) != get_u32(p + 48)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *items[5];
    for (int i = 0; i < 5; i++) items[i] = PyLong_FromUnsignedLongLong(get_u64(p + 8 + 8 * i));
    PyBuffer_Release(&view);
    return new_tuple_of(cls, items, 5);
}

/* decode_reply(cls, msg) -> cls(producer id, status, seq, base LSN, count, "") | None: the twin of
 * protocol.decode_reply_py for a reply of this version with no detail (every ack); None for anything else. */
static PyObject *decode_reply(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *cls, *obj;
    if (!PyArg_ParseTuple(args, "OO", &cls, &obj)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = view.buf;
    if (view.len != 31 || p[0] != 'R' || p[9] != 1) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *items[6] = {PyLong_FromUnsignedLongLong(get_u64(p + 1)), PyLong_FromLong(p[10]),
                          PyLong_FromUnsignedLongLong(get_u64(p + 11)), PyLong_FromUnsignedLongLong(get_u64(p + 19)),
                          PyLong_FromUnsignedLong(get_u32(p + 27)), PyUnicode_FromStringAndSize("", 0)};
    PyBuffer_Release(&view);
    return new_tuple_of(cls, items, 6);
}

/* crc32c(data, value=0) -> int: the same function as the crc32c package's, for the differential tests. */
static PyObject *crc32c_py(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &view, &value)) return NULL;
    uint32_t crc = crc32c_fn(value, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef methods[] = {
    {"count_records", count_records, METH_VARARGS, "Walk a batch's records: (count, compressed spans), or None."},
    {"decode_payload", decode_payload, METH_VARARGS, "A payload's records as Record objects, or None."},
    {"encode_puts", encode_puts, METH_VARARGS, "Plain puts laid end to end, or None."},
    {"encode_put", (PyCFunction)(void (*)(void))encode_put, METH_FASTCALL, "One plain put."},
    {"bind_record", bind_record, METH_O, "Tell the module the Record class to build."},
    {"gc_track", gc_track, METH_O, "Track an object in the cycle collector again."},
    {"crc32c", crc32c_py, METH_VARARGS, "CRC32C of data, continuing from value."},
    {"check_append", check_append, METH_VARARGS, "An APPEND to store: (producer id, seq, payload, count), or None."},
    {"frame_header", (PyCFunction)(void (*)(void))frame_header, METH_FASTCALL, "A DATA or SEAL frame header, or None."},
    {"data_frame_header", (PyCFunction)(void (*)(void))data_frame_header, METH_FASTCALL,
     "A DATA frame's header and the data CRC continued over the frame, or None."},
    {"head", (PyCFunction)(void (*)(void))head, METH_FASTCALL, "The HEAD file's bytes, or None."},
    {"decode_frame_header", decode_frame_header, METH_VARARGS, "A valid frame header's fields as cls, or None."},
    {"data_frame", data_frame, METH_VARARGS, "A whole DATA frame's wanted records and extent, or None."},
    {"decode_head", decode_head, METH_VARARGS, "A valid HEAD's fields as cls, or None."},
    {"decode_reply", decode_reply, METH_VARARGS, "A reply without detail as cls, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "walsvc._record_c", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__record_c(void) {
    const uint16_t probe = 1;
    if (*(const unsigned char *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "walsvc._record_c supports little-endian hosts only");
        return NULL;
    }
    const char *cpu = c_core_init();
    if (PyType_Ready(&PutBufferType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddStringConstant(m, "CRC32C", cpu) < 0 ||
              PyModule_AddObjectRef(m, "PutBuffer", (PyObject *)&PutBufferType) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
