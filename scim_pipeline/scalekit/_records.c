/* Scalekit's directory messages, as protobuf wire bytes -> the warehouse's JSON records: the hot loop of a full sync.
 *
 * users_page(data, organization_id, directory_id) reads a whole ListDirectoryUsersResponse, as it came off the wire,
 * and writes one NDJSON line per user: the same bytes as scim_pipeline.records.users_page_py (the page parsed by
 * protobuf, each user through user_record, each record through orjson). struct_json(data) is the SCIM detail alone:
 * json.dumps of the Struct as plain Python, keys sorted, separators (",", ":"), ensure_ascii off, non-finite numbers
 * as null. Parsing a page into Python objects and converting each user through them cost about 30 us a user, most of
 * a listing process's CPU; this takes a few.
 *
 * The schemas read (field numbers are the wire contract, fixed once a message is published):
 *
 *   ListDirectoryUsersResponse { repeated DirectoryUser users = 1; uint32 total_size = 2; string next_page_token = 3;
 *                                string prev_page_token = 4; }
 *   DirectoryUser  { string id = 1; string email = 2; string preferred_username = 3; string given_name = 4;
 *                    string family_name = 5; Timestamp updated_at = 6; repeated string emails = 16;
 *                    repeated DirectoryGroup groups = 17; Struct user_detail = 18; }
 *   DirectoryGroup { string id = 1; string display_name = 2; int32 total_users = 3; Timestamp updated_at = 4;
 *                    Struct group_detail = 5; }
 *   Timestamp      { int64 seconds = 1; int32 nanos = 2; }
 *   Struct         { map<string, Value> fields = 1; }         (map entry: key = 1, value = 2)
 *   Value          { oneof kind { NullValue null_value = 1; double number_value = 2; string string_value = 3;
 *                                 bool bool_value = 4; Struct struct_value = 5; ListValue list_value = 6; } }
 *   ListValue      { repeated Value values = 1; }
 *
 * Bytes are accepted exactly when protobuf's parser (upb) accepts them, and read as it reads them. Unknown fields, and
 * known ones sent with another wire type, are skipped (unknown groups too, nested like messages); the last of a
 * scalar, map key or oneof member wins; a message field sent twice is the two merged, each part parsed on its own; a
 * map entry carrying an unknown field is left out of the map. Every known field is checked even when it is not
 * written or loses to a later one: strings must be UTF-8, messages well formed and at most 100 deep (protobuf's
 * limit, counting every message and group: a Struct level is three, the Struct, the map entry and the Value). Tags are
 * at most 5 bytes and 32 bits, field number 0 is invalid. Anything else is a ValueError naming the message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 100 /* protobuf's recursion limit: a message nested 100 deep parses, 101 does not */

typedef struct {
    char *data;
    size_t len, cap;
    int discard; /* a sink: what is parsed only to be checked is written nowhere */
} Out;

typedef struct {
    const uint8_t *p, *end;
} In;

typedef struct {
    const uint8_t *p;
    size_t n;
} Span;

/* A growable list of spans, the first few inline: the parts of a message sent more than once, and the like. */
typedef struct {
    Span *v;
    size_t count, cap;
    Span inline_[8];
} Spans;

/* One field as read: its payload when length-delimited, its bytes when fixed-size, its value when a varint. */
typedef struct {
    uint32_t number, wire;
    const uint8_t *p;
    size_t n;
    uint64_t scalar;
} Field;

/* One map entry of a Struct: its key, its value's parts (indices into the Struct's list of them; none is a null). */
typedef struct {
    const uint8_t *key;
    size_t key_len;
    size_t first, parts;
    size_t order;
    int dropped; /* it carried an unknown field: protobuf keeps such an entry out of the map */
} Entry;

/* Where the value of the detail's top-level "active" was written, if it has one. */
typedef struct {
    int found;
    size_t at, len;
} Active;

static const Span EMPTY = {(const uint8_t *)"", 0};

/* Errors say what is wrong; the entry points prefix the message that was being read. */
static int fail(const char *why) {
    PyErr_SetString(PyExc_ValueError, why);
    return -1;
}

static PyObject *failed_reading(const char *message) {
    if (PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_Format(PyExc_ValueError, "not a %s: %S", message, value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
    }
    return NULL;
}

static int put(Out *o, const char *s, size_t n) {
    if (o->discard) return 0;
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap : 256;
        while (cap < o->len + n) cap *= 2;
        char *data = PyMem_Realloc(o->data, cap);
        if (!data) {
            PyErr_NoMemory();
            return -1;
        }
        o->data = data;
        o->cap = cap;
    }
    memcpy(o->data + o->len, s, n);
    o->len += n;
    return 0;
}

#define PUT(o, literal) put((o), (literal), sizeof(literal) - 1)

static void spans_init(Spans *s) {
    s->v = s->inline_;
    s->count = 0;
    s->cap = sizeof s->inline_ / sizeof s->inline_[0];
}

static void spans_free(Spans *s) {
    if (s->v != s->inline_) PyMem_Free(s->v);
}

static int spans_push(Spans *s, const uint8_t *p, size_t n) {
    if (s->count == s->cap) {
        Span *grown = PyMem_Malloc(sizeof(Span) * s->cap * 2);
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(grown, s->v, sizeof(Span) * s->count);
        if (s->v != s->inline_) PyMem_Free(s->v);
        s->v = grown;
        s->cap *= 2;
    }
    s->v[s->count++] = (Span){p, n};
    return 0;
}

/* --- the wire format ---------------------------------------------------------------------------------------------- */

static int varint(In *in, uint64_t *v) {
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) { /* ten bytes at most; bits past 64 are dropped, as protobuf does */
        if (in->p >= in->end) return fail("truncated varint");
        uint8_t b = *in->p++;
        result |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = result;
            return 0;
        }
    }
    return fail("varint too long");
}

static int tag(In *in, uint32_t *number, uint32_t *wire) {
    const uint8_t *start = in->p;
    uint64_t t;
    if (varint(in, &t) < 0) return -1;
    if (in->p - start > 5 || t > UINT32_MAX) return fail("a tag past 32 bits");
    *number = (uint32_t)(t >> 3);
    *wire = (uint32_t)(t & 7);
    return 0;
}

static int skip_group(In *in, uint32_t number, int level);

/* A field's value, after its tag; a group is skipped whole (its level counts towards the depth limit). */
static int field_value(In *in, Field *f, int level) {
    uint64_t n;
    f->p = in->p;
    switch (f->wire) {
    case 0:
        return varint(in, &f->scalar);
    case 1:
        if (in->end - in->p < 8) return fail("truncated fixed64");
        f->n = 8;
        in->p += 8;
        return 0;
    case 2:
        if (varint(in, &n) < 0) return -1;
        if (in->p - f->p > 5 || n >= INT32_MAX) return fail("a length past 2 GiB or 5 bytes"); /* as protobuf's */
        if (n > (uint64_t)(in->end - in->p)) return fail("truncated length-delimited field");
        f->p = in->p;
        f->n = (size_t)n;
        in->p += n;
        return 0;
    case 3:
        if (skip_group(in, f->number, level + 1) < 0) return -1;
        f->n = (size_t)(in->p - f->p);
        return 0;
    case 5:
        if (in->end - in->p < 4) return fail("truncated fixed32");
        f->n = 4;
        in->p += 4;
        return 0;
    default:
        return fail("unsupported wire type");
    }
}

static int skip_group(In *in, uint32_t number, int level) {
    if (level > MAX_DEPTH) return fail("nested too deeply");
    for (;;) {
        Field f;
        if (in->p >= in->end) return fail("a group with no end");
        if (tag(in, &f.number, &f.wire) < 0) return -1;
        if (f.wire == 4) return f.number == number ? 0 : fail("a group ended by another field's end-group tag");
        if (field_value(in, &f, level) < 0) return -1;
    }
}

/* The next field of a message at nesting level `level` (the outermost message is level 0). Field number 0 is
 * refused here, in a message, but not inside an unknown group: protobuf's parser does the same. */
static int next_field(In *in, Field *f, int level) {
    if (tag(in, &f->number, &f->wire) < 0) return -1;
    if (f->wire == 4) return fail("an end-group tag outside a group");
    if (f->number == 0) return fail("field number 0");
    return field_value(in, f, level);
}

/* The length of the valid UTF-8 sequence starting a non-ASCII byte, or 0: what Python's strict decoder accepts
 * (no overlong forms, no surrogates, nothing past U+10FFFF). */
static size_t utf8_sequence(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    size_t len;
    uint8_t lo = 0x80, hi = 0xbf; /* the range of the second byte */
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else return 0;
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    return len;
}

/* A string field: protobuf refuses one that is not UTF-8, whether or not it is kept. */
static int text(const Field *f) {
    for (size_t i = 0; i < f->n;) {
        uint64_t word;
        if (f->n - i >= 8 && (memcpy(&word, f->p + i, 8), !(word & 0x8080808080808080ULL))) {
            i += 8; /* eight ASCII bytes */
            continue;
        }
        if (f->p[i] < 0x80) {
            i++;
            continue;
        }
        size_t len = utf8_sequence(f->p + i, f->n - i);
        if (!len) return fail("a string that is not UTF-8");
        i += len;
    }
    return 0;
}

/* A JSON string, escaped as json.dumps and orjson escape it (ensure_ascii off). The string is UTF-8: every string
 * written was checked when it was read (text()), or came from Python. */
static int string(Out *o, const uint8_t *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    if (o->discard) return 0;
    if (PUT(o, "\"") < 0) return -1;
    size_t start = 0;
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        if ((c >= 0x20 && c != '"' && c != '\\')) { /* non-ASCII bytes too: copied as they are */
            i++;
            continue;
        }
        if (put(o, (const char *)s + start, i - start) < 0) return -1;
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t esc_len = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 0xf];
            esc_len = 6;
        }
        if (put(o, esc, esc_len) < 0) return -1;
        start = ++i;
    }
    if (put(o, (const char *)s + start, n - start) < 0) return -1;
    return PUT(o, "\"");
}

static double fixed64_double(const uint8_t *p) {
    uint64_t bits = 0;
    for (int i = 7; i >= 0; i--) bits = (bits << 8) | p[i];
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static int number(Out *o, const uint8_t *p) {
    if (o->discard) return 0;
    double v = fixed64_double(p);
    if (!isfinite(v)) return PUT(o, "null");
    char *repr = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL); /* float.__repr__, as json.dumps */
    if (!repr) return -1;
    int rc = put(o, repr, strlen(repr));
    PyMem_Free(repr);
    return rc;
}

/* --- Struct ------------------------------------------------------------------------------------------------------ */

/* Each takes a message as its parts (one, unless it was sent more than once) and its nesting level. */
static int struct_(Out *o, const Span *parts, size_t count, int level, Active *active);
static int list(Out *o, const Span *parts, size_t count, int level);

static int value(Out *o, const Span *parts, size_t count, int level) {
    if (level > MAX_DEPTH) return fail("nested too deeply");
    Out sink = {NULL, 0, 0, 1};
    uint32_t kind = 0; /* the oneof member set last; 0 for none */
    const uint8_t *double_ = NULL;
    Span str = EMPTY;
    uint64_t flag = 0;
    Spans member; /* a struct_value's or list_value's parts: consecutive ones merge */
    Field f;
    int rc = -1;
    spans_init(&member);
    for (size_t k = 0; k < count; k++) {
        In in = {parts[k].p, parts[k].p + parts[k].n};
        while (in.p < in.end) {
            if (next_field(&in, &f, level) < 0) goto done;
            if (f.number < 1 || f.number > 6) continue;
            uint32_t expected = f.number == 2 ? 1 : (f.number == 1 || f.number == 4) ? 0 : 2;
            if (f.wire != expected) continue;
            if (f.number != kind && member.count) { /* a message member replaced, after being parsed all the same */
                if ((kind == 5 ? struct_(&sink, member.v, member.count, level + 1, NULL)
                               : list(&sink, member.v, member.count, level + 1)) < 0)
                    goto done;
                member.count = 0;
            }
            kind = f.number;
            if (kind == 2) double_ = f.p;
            else if (kind == 3) {
                if (text(&f) < 0) goto done;
                str = (Span){f.p, f.n};
            } else if (kind == 4) flag = f.scalar;
            else if ((kind == 5 || kind == 6) && spans_push(&member, f.p, f.n) < 0) goto done;
        }
    }
    switch (kind) {
    case 2: rc = number(o, double_); break;
    case 3: rc = string(o, str.p, str.n); break;
    case 4: rc = flag ? PUT(o, "true") : PUT(o, "false"); break;
    case 5: rc = struct_(o, member.v, member.count, level + 1, NULL); break;
    case 6: rc = list(o, member.v, member.count, level + 1); break;
    default: rc = PUT(o, "null"); /* null_value, or no kind set */
    }
done:
    spans_free(&member);
    return rc;
}

static int list(Out *o, const Span *parts, size_t count, int level) {
    if (level > MAX_DEPTH) return fail("nested too deeply");
    Field f;
    int first = 1;
    if (PUT(o, "[") < 0) return -1;
    for (size_t k = 0; k < count; k++) {
        In in = {parts[k].p, parts[k].p + parts[k].n};
        while (in.p < in.end) {
            if (next_field(&in, &f, level) < 0) return -1;
            if (f.number != 1 || f.wire != 2) continue;
            if (!first && PUT(o, ",") < 0) return -1;
            first = 0;
            Span item = {f.p, f.n};
            if (value(o, &item, 1, level + 1) < 0) return -1;
        }
    }
    return PUT(o, "]");
}

static int map_entry(const uint8_t *p, size_t n, int level, Entry *e, Spans *values) {
    if (level > MAX_DEPTH) return fail("nested too deeply");
    In in = {p, p + n};
    Field f;
    e->key = EMPTY.p;
    e->key_len = 0;
    e->first = values->count;
    e->parts = 0;
    e->dropped = 0;
    while (in.p < in.end) {
        if (next_field(&in, &f, level) < 0) return -1;
        if (f.number == 1 && f.wire == 2) {
            if (text(&f) < 0) return -1;
            e->key = f.p;
            e->key_len = f.n;
        } else if (f.number == 2 && f.wire == 2) {
            if (spans_push(values, f.p, f.n) < 0) return -1;
            e->parts++;
        } else e->dropped = 1;
    }
    return 0;
}

static int same_key(const Entry *x, const Entry *y) {
    return x->key_len == y->key_len && !memcmp(x->key, y->key, x->key_len);
}

static int entry_order(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    size_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, n); /* byte order of UTF-8 is code point order, as Python sorts str */
    if (c) return c;
    if (x->key_len != y->key_len) return x->key_len < y->key_len ? -1 : 1;
    return x->order < y->order ? -1 : 1;
}

/* `active`, when given, is told where the value of a top-level "active" was written. */
static int struct_(Out *o, const Span *parts, size_t count, int level, Active *active) {
    if (level > MAX_DEPTH) return fail("nested too deeply");
    Out sink = {NULL, 0, 0, 1};
    Field f;
    size_t n = 0, cap = 16;
    Entry stack[16], *entries = stack;
    Spans values;
    int rc = -1;
    spans_init(&values);
    for (size_t k = 0; k < count; k++) {
        In in = {parts[k].p, parts[k].p + parts[k].n};
        while (in.p < in.end) {
            if (next_field(&in, &f, level) < 0) goto done;
            if (f.number != 1 || f.wire != 2) continue;
            if (n == cap) {
                Entry *grown = PyMem_Malloc(sizeof(Entry) * cap * 2);
                if (!grown) {
                    PyErr_NoMemory();
                    goto done;
                }
                memcpy(grown, entries, sizeof(Entry) * n);
                if (entries != stack) PyMem_Free(entries);
                entries = grown;
                cap *= 2;
            }
            if (map_entry(f.p, f.n, level + 1, &entries[n], &values) < 0) goto done;
            entries[n].order = n;
            n++;
        }
    }
    qsort(entries, n, sizeof(Entry), entry_order);
    if (PUT(o, "{") < 0) goto done;
    int first = 1;
    for (size_t i = 0, end; i < n; i = end) {
        /* a key's entries, in the order sent: the last one kept in the map wins; the others are parsed all the same */
        size_t winner = SIZE_MAX;
        for (end = i; end < n && same_key(&entries[i], &entries[end]); end++)
            if (!entries[end].dropped) winner = end;
        for (size_t j = i; j < end; j++) {
            Entry *e = &entries[j];
            Out *into = o;
            if (j == winner) {
                if (!first && PUT(o, ",") < 0) goto done;
                first = 0;
                if (string(o, e->key, e->key_len) < 0 || PUT(o, ":") < 0) goto done;
            } else into = &sink;
            size_t at = o->len;
            if ((e->parts ? value(into, values.v + e->first, e->parts, level + 2) : put(into, "null", 4)) < 0)
                goto done;
            if (j == winner && active && e->key_len == 6 && !memcmp(e->key, "active", 6))
                *active = (Active){1, at, o->len - at};
        }
    }
    rc = PUT(o, "}");
done:
    if (entries != stack) PyMem_Free(entries);
    spans_free(&values);
    return rc;
}

/* Python's bool() of a plain value, read off its JSON text. */
static int truthy(const char *s, size_t n) {
    static const char *const falsy[] = {"null", "false", "0.0", "-0.0", "\"\"", "{}", "[]"};
    for (size_t i = 0; i < sizeof falsy / sizeof falsy[0]; i++)
        if (n == strlen(falsy[i]) && !memcmp(s, falsy[i], n)) return 0;
    return 1;
}

/* --- Timestamp ---------------------------------------------------------------------------------------------------- */

static int timestamp_fields(const Span *parts, size_t count, int level, int64_t *seconds, int32_t *nanos) {
    Field f;
    *seconds = 0;
    *nanos = 0;
    if (count && level > MAX_DEPTH) return fail("nested too deeply");
    for (size_t k = 0; k < count; k++) {
        In in = {parts[k].p, parts[k].p + parts[k].n};
        while (in.p < in.end) {
            if (next_field(&in, &f, level) < 0) return -1;
            if (f.wire != 0) continue;
            if (f.number == 1) *seconds = (int64_t)f.scalar;
            else if (f.number == 2) *nanos = (int32_t)(uint32_t)f.scalar;
        }
    }
    return 0;
}

static int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

/* A Timestamp as orjson writes a naive datetime ("YYYY-MM-DDTHH:MM:SS[.ffffff]"), nanoseconds truncated to
 * microseconds as protobuf's ToDatetime does; null when unset (both zero). */
static int timestamp(Out *o, const Span *parts, size_t count, int level) {
    int64_t seconds;
    int32_t nanos;
    if (timestamp_fields(parts, count, level, &seconds, &nanos) < 0) return -1;
    if (!seconds && !nanos) return PUT(o, "null");
    const int64_t first = -62135596800LL, last = 253402300799LL; /* 0001-01-01 and 9999-12-31T23:59:59 */
    /* nanos, an int32, moves the time by less than 3 s either way: past that, seconds alone decide */
    if (seconds < first - 3 || seconds > last + 3) return fail("a timestamp outside the years 1 to 9999");
    int64_t micros = seconds * 1000000 + floor_div(nanos, 1000);
    if (micros < first * 1000000 || micros > last * 1000000 + 999999)
        return fail("a timestamp outside the years 1 to 9999");
    int64_t days = floor_div(micros, 86400000000LL), rest = micros - days * 86400000000LL;
    /* civil_from_days (Howard Hinnant's algorithm): days since 1970-01-01 -> year, month, day */
    int64_t z = days + 719468, era = floor_div(z, 146097);
    int64_t doe = z - era * 146097, yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    int64_t day = doy - (153 * mp + 2) / 5 + 1, month = mp < 10 ? mp + 3 : mp - 9;
    int64_t year = yoe + era * 400 + (month <= 2);
    int64_t second = rest / 1000000, micro = rest % 1000000;
    char out[40];
    int n = snprintf(out, sizeof out, "\"%04d-%02d-%02dT%02d:%02d:%02d", (int)year, (int)month, (int)day,
                     (int)(second / 3600), (int)(second / 60 % 60), (int)(second % 60));
    if (micro) n += snprintf(out + n, sizeof out - n, ".%06d", (int)micro);
    out[n++] = '"';
    return put(o, out, (size_t)n);
}

/* --- DirectoryUser ------------------------------------------------------------------------------------------------ */

static int span_order(const void *a, const void *b) {
    const Span *x = a, *y = b;
    size_t n = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->p, y->p, n);
    if (c) return c;
    return x->n < y->n ? -1 : x->n > y->n;
}

/* A DirectoryGroup as the record's {"id", "name"}; its timestamp and detail are not written, but checked. */
static int group_ref(Out *o, const uint8_t *p, size_t n, int level) {
    if (level > MAX_DEPTH) return fail("nested too deeply");
    Out sink = {NULL, 0, 0, 1};
    In in = {p, p + n};
    Field f;
    Span id = EMPTY, name = EMPTY;
    while (in.p < in.end) {
        if (next_field(&in, &f, level) < 0) return -1;
        if (f.wire != 2 || f.number < 1 || f.number > 5 || f.number == 3) continue;
        Span part = {f.p, f.n};
        int64_t seconds;
        int32_t nanos;
        if (f.number <= 2) {
            if (text(&f) < 0) return -1;
            if (f.number == 1) id = part;
            else name = part;
        } else if (f.number == 4) {
            if (timestamp_fields(&part, 1, level + 1, &seconds, &nanos) < 0) return -1;
        } else if (struct_(&sink, &part, 1, level + 1, NULL) < 0) return -1;
    }
    if (PUT(o, "{\"id\":") < 0 || string(o, id.p, id.n) < 0 || PUT(o, ",\"name\":") < 0 ||
        string(o, name.p, name.n) < 0)
        return -1;
    return PUT(o, "}");
}

/* `detail` is scratch space: the detail is written there first, as the record's "active" is read off it. */
static int user(Out *o, Out *detail, const uint8_t *p, size_t n, Span organization, Span directory, int level) {
    if (level > MAX_DEPTH) return fail("nested too deeply");
    In in = {p, p + n};
    Field f;
    /* the string fields by number: 1 id, 2 email, 3 preferred_username, 4 given_name, 5 family_name */
    Span text_[6] = {EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY};
    Spans updated, emails, groups, details;
    Active active = {0, 0, 0};
    int rc = -1;
    spans_init(&updated);
    spans_init(&emails);
    spans_init(&groups);
    spans_init(&details);
    while (in.p < in.end) {
        if (next_field(&in, &f, level) < 0) goto done;
        if (!((f.number >= 1 && f.number <= 6) || (f.number >= 16 && f.number <= 18)) || f.wire != 2) continue;
        if ((f.number <= 5 || f.number == 16) && text(&f) < 0) goto done;
        Spans *into = f.number == 6 ? &updated : f.number == 16 ? &emails : f.number == 17 ? &groups
                    : f.number == 18 ? &details : NULL;
        if (into) {
            if (spans_push(into, f.p, f.n) < 0) goto done;
        } else {
            text_[f.number] = (Span){f.p, f.n};
        }
    }
    detail->len = 0;
    if (struct_(detail, details.v, details.count, level + 1, &active) < 0) goto done;
    qsort(emails.v, emails.count, sizeof(Span), span_order);
    /* true when the detail has no "active" (a directory that does not send it deprovisions by deleting) */
    int is_active = !active.found || truthy(detail->data + active.at, active.len);
    if (PUT(o, "{\"user_id\":") < 0 || string(o, text_[1].p, text_[1].n) < 0 ||
        PUT(o, ",\"organization_id\":") < 0 || string(o, organization.p, organization.n) < 0 ||
        PUT(o, ",\"directory_id\":") < 0 || string(o, directory.p, directory.n) < 0 ||
        PUT(o, ",\"email\":") < 0 || string(o, text_[2].p, text_[2].n) < 0 ||
        PUT(o, ",\"given_name\":") < 0 || string(o, text_[4].p, text_[4].n) < 0 ||
        PUT(o, ",\"family_name\":") < 0 || string(o, text_[5].p, text_[5].n) < 0 ||
        PUT(o, ",\"preferred_username\":") < 0 || string(o, text_[3].p, text_[3].n) < 0 ||
        (is_active ? PUT(o, ",\"active\":true") : PUT(o, ",\"active\":false")) < 0 || PUT(o, ",\"emails\":[") < 0)
        goto done;
    for (size_t i = 0; i < emails.count; i++)
        if ((i && PUT(o, ",") < 0) || string(o, emails.v[i].p, emails.v[i].n) < 0) goto done;
    if (PUT(o, "],\"groups\":[") < 0) goto done;
    for (size_t i = 0; i < groups.count; i++)
        if ((i && PUT(o, ",") < 0) || group_ref(o, groups.v[i].p, groups.v[i].n, level + 1) < 0) goto done;
    if (PUT(o, "],\"updated_at\":") < 0 || timestamp(o, updated.v, updated.count, level + 1) < 0 ||
        PUT(o, ",\"detail\":") < 0 || put(o, detail->data, detail->len) < 0)
        goto done;
    rc = PUT(o, "}\n");
done:
    spans_free(&updated);
    spans_free(&emails);
    spans_free(&groups);
    spans_free(&details);
    return rc;
}

/* --- entry points ------------------------------------------------------------------------------------------------- */

static PyObject *struct_json(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer buffer;
    if (PyObject_GetBuffer(arg, &buffer, PyBUF_SIMPLE) < 0) return NULL;
    Out out = {NULL, 0, 0, 0};
    Span whole = {buffer.buf, (size_t)buffer.len};
    PyObject *result = NULL;
    if (struct_(&out, &whole, 1, 0, NULL) == 0)
        result = PyUnicode_DecodeUTF8(out.data, (Py_ssize_t)out.len, "strict");
    else
        failed_reading("google.protobuf.Struct");
    PyMem_Free(out.data);
    PyBuffer_Release(&buffer);
    return result;
}

static PyObject *users_page(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buffer;
    const char *organization, *directory;
    Py_ssize_t organization_len, directory_len;
    if (!PyArg_ParseTuple(args, "y*s#s#", &buffer, &organization, &organization_len, &directory, &directory_len))
        return NULL;
    Span org = {(const uint8_t *)organization, (size_t)organization_len};
    Span dir = {(const uint8_t *)directory, (size_t)directory_len};
    In in = {buffer.buf, (const uint8_t *)buffer.buf + buffer.len};
    Out out = {NULL, 0, 0, 0}, detail = {NULL, 0, 0, 0};
    Field f;
    Span token = EMPTY;
    Py_ssize_t count = 0;
    PyObject *result = NULL;
    while (in.p < in.end) {
        if (next_field(&in, &f, 0) < 0) goto failed;
        if (f.wire != 2) continue;
        if (f.number == 1) {
            if (user(&out, &detail, f.p, f.n, org, dir, 1) < 0) goto failed;
            count++;
        } else if (f.number == 3 || f.number == 4) { /* next_page_token, prev_page_token */
            if (text(&f) < 0) goto failed;
            if (f.number == 3) token = (Span){f.p, f.n};
        }
    }
    PyObject *lines = PyBytes_FromStringAndSize(out.data ? out.data : "", (Py_ssize_t)out.len);
    if (lines) result = Py_BuildValue("(Nns#)", lines, count, (const char *)token.p, (Py_ssize_t)token.n);
    goto done;
failed:
    failed_reading("ListDirectoryUsersResponse");
done:
    PyMem_Free(out.data);
    PyMem_Free(detail.data);
    PyBuffer_Release(&buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"struct_json", struct_json, METH_O,
     "struct_json(data: bytes) -> str\n\nA serialized google.protobuf.Struct as compact JSON text, keys sorted."},
    {"users_page", users_page, METH_VARARGS,
     "users_page(data: bytes, organization_id: str, directory_id: str) -> (bytes, int, str)\n\n"
     "A serialized ListDirectoryUsersResponse as NDJSON warehouse records, their count and the next page token."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_records", NULL, 0, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__records(void) { return PyModule_Create(&module); }
