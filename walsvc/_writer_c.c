/* The writer's store of one batch in C: the compiled twin of what walsvc/writer.py does with an APPEND that is
 * its producer's next batch (Writer._handle's common case).  A service-layer module: it writes a frame to the
 * active segment (one pwritev) and answers through the writer's own objects.  The Python stays the reference
 * and takes every other message; tests/test_batch_appender.py holds the two to one behaviour.
 */

#include "_c_core.h"
#include <errno.h>
#include <stdio.h>
#include <sys/uio.h>
#include <time.h>

/* BatchAppender(log, pending, counters, appended_cls, note, clock, max_record_bytes, max_batch_bytes,
 *               segment_bytes, index_interval_bytes)
 * .store(msg) -> True | False
 * The compiled twin of what the writer does with an APPEND that is its producer's next batch: the checks of
 * ingest.IngestSession.decide, Log.append_encoded (one pwritev) and the bookkeeping of Writer._handle's
 * Store branch (counters, the pipelining note, the pending ack).  It reads and writes the same attributes of
 * the same objects as that Python, so the two can take turns batch by batch.  It declines (False, having
 * changed nothing) on anything else: a producer's first batch, a resend, a gap, a batch that does not fit the
 * active segment, a busy write lock, a closed or stopped log; the Python then decides.  A failed write
 * stops the log as the Python's does (Syncer.fail) and raises its LogStoppedError. */

enum {
    S_PRODUCERS, S_WRITE_LOCK, S_ACQUIRE, S_RELEASE, S_CLOSED, S_SYNCER, S_FAILED, S_ACTIVE, S_END,
    S_RECORD_COUNT, S_FD, S_DATA_CRC, S_NEXT_INDEX_AT, S_INDEX, S_LAST_LSN, S_PATH, S_NEXT_LSN, S_LAST_TS,
    S_RECORDS_APPENDED, S_BYTES_APPENDED, S_WRITTEN_STATE, S_WRITTEN, S_APPEND, S_BATCHES, S_RECORDS, N_NAMES
};
static const char *name_strings[N_NAMES] = {
    "_producers", "_write_lock", "acquire", "release", "_closed", "_syncer", "failed", "_active", "end",
    "record_count", "fd", "data_crc", "next_index_at", "index", "last_lsn", "path", "_next_lsn", "_last_ts",
    "records_appended", "bytes_appended", "_written", "written", "append", "batches", "records"};
static PyObject *names[N_NAMES];

typedef struct {
    PyObject_HEAD
    PyObject *log, *pending, *counters, *appended_cls, *note, *clock;
    unsigned long long max_record, max_batch, segment_bytes, index_interval;
} BatchAppender;

static int appender_init(BatchAppender *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"log", "pending", "counters", "appended_cls", "note", "clock", "max_record_bytes",
                             "max_batch_bytes", "segment_bytes", "index_interval_bytes", NULL};
    PyObject *log, *pending, *counters, *appended_cls, *note, *clock;
    unsigned long long max_record, max_batch, segment_bytes, index_interval;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!OOOKKKK", kwlist, &log, &pending, &PyDict_Type, &counters,
                                     &appended_cls, &note, &clock, &max_record, &max_batch, &segment_bytes,
                                     &index_interval))
        return -1;
    if (!PyType_Check(appended_cls) || !PyType_IsSubtype((PyTypeObject *)appended_cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "appended_cls must be a tuple subclass");
        return -1;
    }
    PyObject *refs[6] = {log, pending, counters, appended_cls, note, clock};
    PyObject **slots[6] = {&self->log, &self->pending, &self->counters, &self->appended_cls, &self->note,
                           &self->clock};
    for (int i = 0; i < 6; i++) Py_XSETREF(*slots[i], Py_NewRef(refs[i]));
    self->max_record = max_record;
    self->max_batch = max_batch;
    self->segment_bytes = segment_bytes;
    self->index_interval = index_interval;
    return 0;
}

static int appender_traverse(BatchAppender *self, visitproc visit, void *arg) {
    Py_VISIT(self->log);
    Py_VISIT(self->pending);
    Py_VISIT(self->counters);
    Py_VISIT(self->appended_cls);
    Py_VISIT(self->note);
    Py_VISIT(self->clock);
    return 0;
}

static int appender_clear(BatchAppender *self) {
    Py_CLEAR(self->log);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->counters);
    Py_CLEAR(self->appended_cls);
    Py_CLEAR(self->note);
    Py_CLEAR(self->clock);
    return 0;
}

static void appender_dealloc(BatchAppender *self) {
    PyObject_GC_UnTrack(self);
    appender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* obj.<names[i]> as an unsigned 64-bit integer: 0, or -1 with an exception set. */
static int get_attr_u64(PyObject *obj, int i, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, names[i]);
    if (!v) return -1;
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = u;
    return 0;
}

static int set_attr_u64(PyObject *obj, int i, uint64_t value) {
    PyObject *v = PyLong_FromUnsignedLongLong(value);
    if (!v) return -1;
    int r = PyObject_SetAttr(obj, names[i], v);
    Py_DECREF(v);
    return r;
}

/* counters[names[i]] += n */
static int count_up(PyObject *counters, int i, uint64_t n) {
    PyObject *old = PyDict_GetItemWithError(counters, names[i]);
    if (!old && PyErr_Occurred()) return -1;
    unsigned long long was = 0;
    if (old) {
        was = PyLong_AsUnsignedLongLong(old);
        if (was == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    PyObject *v = PyLong_FromUnsignedLongLong(was + n);
    if (!v) return -1;
    int r = PyDict_SetItem(counters, names[i], v);
    Py_DECREF(v);
    return r;
}

/* Write the frame (header, payload) at `offset`, finishing a short write as fsync.pwrite_all does: 0, or the
 * errno that stopped it (EIO for a write that made no progress, said in `why`, which holds WHY_SIZE bytes). */
#define WHY_SIZE 96
static int write_frame(int fd, const unsigned char *header, const unsigned char *payload, size_t plen,
                       uint64_t offset, char *why) {
    struct iovec iov[2] = {{(void *)header, 56}, {(void *)payload, plen}};
    size_t size = 56 + plen, done = 0;
    int err = 0;
    why[0] = '\0';
    Py_BEGIN_ALLOW_THREADS
    while (done < size) {
        struct iovec rest[2];
        int n_iov = 0;
        size_t skip = done;
        for (int i = 0; i < 2; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            rest[n_iov].iov_base = (char *)iov[i].iov_base + skip;
            rest[n_iov++].iov_len = iov[i].iov_len - skip;
            skip = 0;
        }
        ssize_t n = pwritev(fd, rest, n_iov, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        if (n == 0) {
            err = EIO;
            snprintf(why, WHY_SIZE, "write made no progress at %zu of %zu bytes", done, size);
            break;
        }
        done += (size_t)n;
    }
    Py_END_ALLOW_THREADS
    return err;
}

/* Stop the log for a failed frame write, as Log.append_encoded does: raise syncer.fail(...)'s
 * LogStoppedError with the OSError as its cause.  Always returns -1. */
static int fail_write(PyObject *syncer, PyObject *seg, uint64_t offset, int err, const char *why) {
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, why[0] ? why : strerror(err));
    if (!exc) return -1;
    PyObject *path = PyObject_GetAttr(seg, names[S_PATH]);
    PyObject *stopped = path ? PyObject_CallMethod(syncer, "fail", "NOO",
                                                   PyUnicode_FromFormat("frame write at offset %llu",
                                                                        (unsigned long long)offset),
                                                   path, exc)
                             : NULL;
    Py_XDECREF(path);
    if (!stopped) {
        Py_DECREF(exc);
        return -1;
    }
    PyException_SetCause(stopped, exc);
    PyErr_SetObject((PyObject *)Py_TYPE(stopped), stopped);
    Py_DECREF(stopped);
    return -1;
}

/* Under the write lock, the rest of store(): 1 stored, 0 declined (nothing changed), -1 error. */
static int store_locked(BatchAppender *self, PyObject *window, const unsigned char *payload, uint32_t plen,
                        uint64_t pid, uint64_t seq, uint32_t count, uint64_t *base_out) {
    PyObject *log = self->log, *syncer = NULL, *seg = NULL, *v = NULL, *fd_obj = NULL, *path = NULL;
    int rc = -1;
    v = PyObject_GetAttr(log, names[S_CLOSED]);
    if (!v) goto done;
    int closed = PyObject_IsTrue(v);
    Py_CLEAR(v);
    if (closed) {
        rc = closed < 0 ? -1 : 0;
        goto done;
    }
    if (!(syncer = PyObject_GetAttr(log, names[S_SYNCER])) || !(v = PyObject_GetAttr(syncer, names[S_FAILED])))
        goto done;
    if (v != Py_None) {
        rc = 0;
        goto done;
    }
    Py_CLEAR(v);
    uint64_t end, record_count, next_index_at, base, last_ts, data_crc, appended, appended_bytes;
    uint64_t size = 56 + (uint64_t)plen;
    if (!(seg = PyObject_GetAttr(log, names[S_ACTIVE])) || get_attr_u64(seg, S_END, &end) ||
        get_attr_u64(seg, S_RECORD_COUNT, &record_count))
        goto done;
    if (end + size > self->segment_bytes && record_count) {
        rc = 0;  /* the Python rotates first */
        goto done;
    }
    if (!(fd_obj = PyObject_GetAttr(seg, names[S_FD]))) goto done;
    long fd = PyLong_AsLong(fd_obj);
    if (fd == -1 && PyErr_Occurred()) goto done;
    if (get_attr_u64(seg, S_DATA_CRC, &data_crc) ||
        get_attr_u64(seg, S_NEXT_INDEX_AT, &next_index_at) || get_attr_u64(log, S_NEXT_LSN, &base) ||
        get_attr_u64(log, S_LAST_TS, &last_ts) || get_attr_u64(log, S_RECORDS_APPENDED, &appended) ||
        get_attr_u64(log, S_BYTES_APPENDED, &appended_bytes))
        goto done;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t ts = (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u;
    if (ts < last_ts + 1) ts = last_ts + 1;
    if (set_attr_u64(log, S_LAST_TS, ts)) goto done;
    unsigned char header[56];
    uint32_t crc = build_data_header(header, payload, plen, count, base, ts, pid, seq, (uint32_t)data_crc);
    char why[WHY_SIZE];
    int err = write_frame((int)fd, header, payload, plen, end, why);
    if (err) {
        fail_write(syncer, seg, end, err, why);
        goto done;
    }
    uint64_t end_lsn = base + count;
    if (set_attr_u64(seg, S_DATA_CRC, crc)) goto done;
    if (end >= next_index_at) {
        PyObject *entry = Py_BuildValue("(KK)", (unsigned long long)base, (unsigned long long)end);
        PyObject *index = entry ? PyObject_GetAttr(seg, names[S_INDEX]) : NULL;
        int bad = !index || PyList_Append(index, entry) < 0;
        Py_XDECREF(entry);
        Py_XDECREF(index);
        if (bad || set_attr_u64(seg, S_NEXT_INDEX_AT, end + self->index_interval)) goto done;
    }
    if (set_attr_u64(seg, S_END, end + size) || set_attr_u64(seg, S_LAST_LSN, end_lsn - 1) ||
        set_attr_u64(seg, S_RECORD_COUNT, record_count + count) || set_attr_u64(log, S_NEXT_LSN, end_lsn) ||
        set_attr_u64(log, S_RECORDS_APPENDED, appended + count) ||
        set_attr_u64(log, S_BYTES_APPENDED, appended_bytes + size))
        goto done;
    PyObject *items[3] = {PyLong_FromUnsignedLongLong(seq), PyLong_FromUnsignedLongLong(base),
                          PyLong_FromUnsignedLong(count)};
    PyObject *batch = new_tuple_of(self->appended_cls, items, 3);
    if (!batch || !(v = PyObject_CallMethodOneArg(window, names[S_APPEND], batch))) {
        Py_XDECREF(batch);
        goto done;
    }
    Py_DECREF(batch);
    Py_CLEAR(v);
    if (!(path = PyObject_GetAttr(seg, names[S_PATH])) ||
        !(v = Py_BuildValue("(OKO)", fd_obj, (unsigned long long)end_lsn, path)) ||
        PyObject_SetAttr(log, names[S_WRITTEN_STATE], v) < 0)
        goto done;
    Py_CLEAR(v);
    PyObject *n = PyLong_FromUnsignedLongLong(end_lsn);
    if (!n || !(v = PyObject_CallMethodOneArg(syncer, names[S_WRITTEN], n))) {
        Py_XDECREF(n);
        goto done;
    }
    Py_DECREF(n);
    *base_out = base;
    rc = 1;
done:
    Py_XDECREF(v);
    Py_XDECREF(syncer);
    Py_XDECREF(seg);
    Py_XDECREF(fd_obj);
    Py_XDECREF(path);
    return rc;
}

static PyObject *appender_store(BatchAppender *self, PyObject *msg) {
    Py_buffer view;
    if (PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = view.buf;
    PyObject *producers = NULL, *key = NULL, *last = NULL, *lock = NULL, *v = NULL;
    int rc = -1;
    uint64_t pid, seq, base = 0;
    uint32_t count;
    if (parse_append(buf, view.len, self->max_record, self->max_batch, &pid, &seq, &count)) {
        rc = 0;
        goto done;
    }
    if (!(producers = PyObject_GetAttr(self->log, names[S_PRODUCERS])) ||
        !(key = PyLong_FromUnsignedLongLong(pid)))
        goto done;
    PyObject *window = PyDict_GetItemWithError(producers, key);  /* borrowed */
    if (!window) {
        rc = PyErr_Occurred() ? -1 : 0;  /* a producer's first batch: the Python notes its arrival */
        goto done;
    }
    Py_ssize_t known = PyObject_Size(window);
    if (known < 0) goto done;
    if (known == 0) {
        rc = 0;
        goto done;
    }
    if (!(last = PySequence_GetItem(window, known - 1))) goto done;
    PyObject *last_seq = PyTuple_Check(last) && PyTuple_GET_SIZE(last) ? PyTuple_GET_ITEM(last, 0) : NULL;
    unsigned long long was = last_seq ? PyLong_AsUnsignedLongLong(last_seq) : 0;
    if (!last_seq || (was == (unsigned long long)-1 && PyErr_Occurred())) {
        PyErr_Clear();
        rc = 0;
        goto done;
    }
    if (was == UINT64_MAX || seq != was + 1) {  /* a resend or a gap: the Python answers it */
        rc = 0;
        goto done;
    }
    Py_INCREF(window);  /* the dict may drop it while the lock's acquire runs Python */
    if (!(lock = PyObject_GetAttr(self->log, names[S_WRITE_LOCK])) ||
        !(v = PyObject_CallMethodOneArg(lock, names[S_ACQUIRE], Py_False))) {
        Py_DECREF(window);
        goto done;
    }
    if (v != Py_True) {  /* another thread appends or rotates: the Python waits for it */
        Py_DECREF(window);
        rc = 0;
        goto done;
    }
    Py_CLEAR(v);
    rc = store_locked(self, window, buf + 28, (uint32_t)(view.len - 28), pid, seq, count, &base);
    Py_DECREF(window);
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *released = PyObject_CallMethodNoArgs(lock, names[S_RELEASE]);
    if (!released) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        rc = -1;
        goto done;
    }
    Py_DECREF(released);
    PyErr_Restore(type, value, traceback);
    if (rc != 1) goto done;
    rc = -1;
    if (count_up(self->counters, S_BATCHES, 1) || count_up(self->counters, S_RECORDS, count)) goto done;
    if (self->note != Py_None) {
        if (!(v = PyObject_CallOneArg(self->note, key))) goto done;  /* key: the producer id */
        Py_CLEAR(v);
    }
    PyObject *at = PyObject_CallNoArgs(self->clock);
    if (!at) goto done;
    unsigned char ack[31];
    uint64_t fields[3] = {seq, base, 0};
    ack[0] = 'R';
    memcpy(ack + 1, &pid, 8);
    ack[9] = 1;   /* VERSION */
    ack[10] = 0;  /* ACK */
    memcpy(ack + 11, fields, 16);
    memcpy(ack + 27, &count, 4);
    v = Py_BuildValue("(KNy#)", (unsigned long long)(base + count - 1), at, (const char *)ack, (Py_ssize_t)31);
    if (!v) goto done;
    PyObject *appended = PyObject_CallMethodOneArg(self->pending, names[S_APPEND], v);
    if (!appended) goto done;
    Py_DECREF(appended);
    rc = 1;
done:
    Py_XDECREF(producers);
    Py_XDECREF(key);
    Py_XDECREF(last);
    Py_XDECREF(lock);
    Py_XDECREF(v);
    PyBuffer_Release(&view);
    if (rc < 0) return NULL;
    return PyBool_FromLong(rc);
}

static PyMethodDef appender_methods[] = {
    {"store", (PyCFunction)appender_store, METH_O, "Store an APPEND that is its producer's next batch: True, "
                                                   "or False (declined, nothing changed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BatchAppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "walsvc._writer_c.BatchAppender",
    .tp_basicsize = sizeof(BatchAppender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The writer's store of a producer's next batch (Writer._handle's common case), compiled.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)appender_init,
    .tp_traverse = (traverseproc)appender_traverse,
    .tp_clear = (inquiry)appender_clear,
    .tp_dealloc = (destructor)appender_dealloc,
    .tp_methods = appender_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "walsvc._writer_c", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__writer_c(void) {
    c_core_init();
    if (PyType_Ready(&BatchAppenderType) < 0) return NULL;
    for (int i = 0; i < N_NAMES; i++)
        if (!(names[i] = PyUnicode_InternFromString(name_strings[i]))) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "BatchAppender", (PyObject *)&BatchAppenderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
