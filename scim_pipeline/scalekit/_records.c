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
 *   ListDirectoryUsersResponse { repeated DirectoryUser users = 1; string next_page_token = 3; ... }
 *   DirectoryUser  { string id = 1; string email = 2; string preferred_username = 3; string given_name = 4;
 *                    string family_name = 5; Timestamp updated_at = 6; repeated string emails = 16;
 *                    repeated DirectoryGroup groups = 17; Struct user_detail = 18; }
 *   DirectoryGroup { string id = 1; string display_name = 2; ... }
 *   Timestamp      { int64 seconds = 1; int32 nanos = 2; }
 *   Struct         { map<string, Value> fields = 1; }         (map entry: key = 1, value = 2)
 *   Value          { oneof kind { NullValue null_value = 1; double number_value = 2; string string_value = 3;
 *                                 bool bool_value = 4; Struct struct_value = 5; ListValue list_value = 6; } }
 *   ListValue      { repeated Value values = 1; }
 *
 * As protobuf parsers do: unknown fields, and known ones sent with another wire type, are skipped; the last of a
 * repeated scalar, map key or oneof member wins; a message field sent twice is the two merged; strings must be UTF-8.
 * Anything else is a ValueError naming the message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 100 /* protobuf's own recursion limit: a parsed message is never deeper */

typedef struct {
    char *data;
    size_t len, cap;
} Out;

typedef struct {
    const uint8_t *p, *end;
} In;

typedef struct {
    const uint8_t *p;
    size_t n;
} Span;

/* A growable list of spans, the first few inline. */
typedef struct {
    Span *v;
    size_t count, cap;
    Span inline_[8];
} Spans;

typedef struct {
    const uint8_t *key, *value; /* value is NULL when the entry has none (a null) */
    size_t key_len, value_len;
    size_t order;
} Entry;

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

/* A message field sent more than once is its parts merged, which on the wire is their concatenation; *owned is set
 * when that needed a buffer (the caller frees it). */
static int merged(const Spans *s, Span *out, uint8_t **owned) {
    *owned = NULL;
    if (s->count <= 1) {
        *out = s->count ? s->v[0] : (Span){(const uint8_t *)"", 0};
        return 0;
    }
    size_t n = 0;
    for (size_t i = 0; i < s->count; i++) n += s->v[i].n;
    uint8_t *joined = PyMem_Malloc(n ? n : 1);
    if (!joined) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0, at = 0; i < s->count; at += s->v[i].n, i++) memcpy(joined + at, s->v[i].p, s->v[i].n);
    *owned = joined;
    *out = (Span){joined, n};
    return 0;
}

static int varint(In *in, uint64_t *v) {
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) {
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

/* One field's tag; for length-delimited fields also its payload, for varints their value; others are skipped. */
static int field(In *in, uint32_t *number, uint32_t *wire, const uint8_t **payload, size_t *len, uint64_t *scalar) {
    uint64_t tag, n;
    if (varint(in, &tag) < 0) return -1;
    *number = (uint32_t)(tag >> 3);
    *wire = (uint32_t)(tag & 7);
    *payload = in->p;
    switch (*wire) {
    case 0:
        return varint(in, scalar);
    case 1:
        if (in->end - in->p < 8) return fail("truncated fixed64");
        in->p += 8;
        return 0;
    case 2:
        if (varint(in, &n) < 0) return -1;
        if (n > (uint64_t)(in->end - in->p)) return fail("truncated length-delimited field");
        *payload = in->p;
        *len = (size_t)n;
        in->p += n;
        return 0;
    case 5:
        if (in->end - in->p < 4) return fail("truncated fixed32");
        in->p += 4;
        return 0;
    default:
        return fail("unsupported wire type");
    }
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

static int utf8_valid(Span s) {
    for (size_t i = 0; i < s.n;) {
        if (s.p[i] < 0x80) {
            i++;
            continue;
        }
        size_t len = utf8_sequence(s.p + i, s.n - i);
        if (!len) return 0;
        i += len;
    }
    return 1;
}

/* A JSON string, escaped as json.dumps and orjson escape it (ensure_ascii off). */
static int string(Out *o, const uint8_t *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    if (PUT(o, "\"") < 0) return -1;
    size_t start = 0;
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            i++;
            continue;
        }
        if (c >= 0x80) {
            size_t len = utf8_sequence(s + i, n - i);
            if (!len) return fail("a string that is not UTF-8");
            i += len;
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
    double v = fixed64_double(p);
    if (!isfinite(v)) return PUT(o, "null");
    char *repr = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL); /* float.__repr__, as json.dumps */
    if (!repr) return -1;
    int rc = put(o, repr, strlen(repr));
    PyMem_Free(repr);
    return rc;
}

/* --- Struct ------------------------------------------------------------------------------------------------------ */

static int struct_(Out *o, const uint8_t *p, size_t n, int depth);
static int list(Out *o, const uint8_t *p, size_t n, int depth);

/* A Value's kind (the last oneof member sent wins; 0 for none) and that member's payload. */
static int value_kind(const uint8_t *p, size_t n, uint32_t *kind, Span *payload, uint64_t *flag) {
    In in = {p, p + n};
    uint32_t number_, wire;
    const uint8_t *at;
    size_t len = 0;
    uint64_t scalar = 0;
    *kind = 0;
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &at, &len, &scalar) < 0) return -1;
        if (number_ < 1 || number_ > 6) continue;
        uint32_t expected = number_ == 2 ? 1 : (number_ == 1 || number_ == 4) ? 0 : 2;
        if (wire != expected) continue;
        *kind = number_;
        *payload = (Span){at, len};
        *flag = scalar;
    }
    return 0;
}

static int value(Out *o, const uint8_t *p, size_t n, int depth) {
    if (depth > MAX_DEPTH) return fail("nested too deeply");
    uint32_t kind;
    Span payload = {NULL, 0};
    uint64_t flag = 0;
    if (value_kind(p, n, &kind, &payload, &flag) < 0) return -1;
    switch (kind) {
    case 2:
        return number(o, payload.p);
    case 3:
        return string(o, payload.p, payload.n);
    case 4:
        return flag ? PUT(o, "true") : PUT(o, "false");
    case 5:
        return struct_(o, payload.p, payload.n, depth + 1);
    case 6:
        return list(o, payload.p, payload.n, depth + 1);
    default: /* null_value, or no kind set */
        return PUT(o, "null");
    }
}

static int list(Out *o, const uint8_t *p, size_t n, int depth) {
    In in = {p, p + n};
    uint32_t number_, wire;
    const uint8_t *payload;
    size_t len = 0;
    uint64_t scalar;
    int first = 1;
    if (PUT(o, "[") < 0) return -1;
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &payload, &len, &scalar) < 0) return -1;
        if (number_ != 1 || wire != 2) continue;
        if (!first && PUT(o, ",") < 0) return -1;
        first = 0;
        if (value(o, payload, len, depth) < 0) return -1;
    }
    return PUT(o, "]");
}

/* One map entry of a Struct: its key and its value (NULL when it has none). */
static int map_entry(const uint8_t *p, size_t n, Entry *e) {
    In entry = {p, p + n};
    uint32_t number_, wire;
    const uint8_t *part;
    size_t part_len = 0;
    uint64_t scalar;
    e->key = (const uint8_t *)"";
    e->key_len = 0;
    e->value = NULL;
    e->value_len = 0;
    while (entry.p < entry.end) {
        if (field(&entry, &number_, &wire, &part, &part_len, &scalar) < 0) return -1;
        if (wire != 2) continue;
        if (number_ == 1) {
            e->key = part;
            e->key_len = part_len;
        } else if (number_ == 2) {
            e->value = part;
            e->value_len = part_len;
        }
    }
    return 0;
}

static int entry_order(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    size_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, n); /* byte order of UTF-8 is code point order, as Python sorts str */
    if (c) return c;
    if (x->key_len != y->key_len) return x->key_len < y->key_len ? -1 : 1;
    return x->order < y->order ? -1 : 1;
}

static int struct_(Out *o, const uint8_t *p, size_t n, int depth) {
    if (depth > MAX_DEPTH) return fail("nested too deeply");
    In in = {p, p + n};
    uint32_t number_, wire;
    const uint8_t *payload;
    size_t len = 0, count = 0, cap = 16;
    uint64_t scalar;
    Entry stack[16], *entries = stack;
    int rc = -1;
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &payload, &len, &scalar) < 0) goto done;
        if (number_ != 1 || wire != 2) continue;
        if (count == cap) {
            Entry *grown = PyMem_Malloc(sizeof(Entry) * cap * 2);
            if (!grown) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(grown, entries, sizeof(Entry) * count);
            if (entries != stack) PyMem_Free(entries);
            entries = grown;
            cap *= 2;
        }
        if (map_entry(payload, len, &entries[count]) < 0) goto done;
        entries[count].order = count;
        count++;
    }
    qsort(entries, count, sizeof(Entry), entry_order);
    if (PUT(o, "{") < 0) goto done;
    int first = 1;
    for (size_t i = 0; i < count; i++) {
        Entry *e = &entries[i];
        if (i + 1 < count && e->key_len == entries[i + 1].key_len && !memcmp(e->key, entries[i + 1].key, e->key_len))
            continue; /* a repeated key: the last one wins */
        if (!first && PUT(o, ",") < 0) goto done;
        first = 0;
        if (string(o, e->key, e->key_len) < 0 || PUT(o, ":") < 0) goto done;
        if ((e->value ? value(o, e->value, e->value_len, depth) : PUT(o, "null")) < 0) goto done;
    }
    rc = PUT(o, "}");
done:
    if (entries != stack) PyMem_Free(entries);
    return rc;
}

/* Whether a user is active: the detail's top-level "active", as Python's bool() of its plain value; true when the
 * detail has none (a directory that does not send it deprovisions by deleting). Malformed parts are left for
 * struct_() to report. */
static int detail_active(Span detail, int *active) {
    In in = {detail.p, detail.p + detail.n};
    uint32_t number_, wire;
    const uint8_t *payload;
    size_t len = 0;
    uint64_t scalar;
    Entry e, found = {NULL, NULL, 0, 0, 0};
    int seen = 0;
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &payload, &len, &scalar) < 0) return -1;
        if (number_ != 1 || wire != 2) continue;
        if (map_entry(payload, len, &e) < 0) return -1;
        if (e.key_len == 6 && !memcmp(e.key, "active", 6)) {
            found = e;
            seen = 1;
        }
    }
    *active = 1;
    if (!seen) return 0;
    *active = 0;
    if (!found.value) return 0; /* null */
    uint32_t kind;
    Span member = {NULL, 0};
    uint64_t flag = 0;
    if (value_kind(found.value, found.value_len, &kind, &member, &flag) < 0) return -1;
    switch (kind) {
    case 2: {
        double v = fixed64_double(member.p);
        *active = isfinite(v) && v != 0; /* non-finite numbers read as null */
        return 0;
    }
    case 3:
        *active = member.n > 0;
        return 0;
    case 4:
        *active = flag != 0;
        return 0;
    case 5:
    case 6: { /* a non-empty object or list: any field 1 (a map entry, a list item) */
        In inner = {member.p, member.p + member.n};
        while (inner.p < inner.end) {
            if (field(&inner, &number_, &wire, &payload, &len, &scalar) < 0) return -1;
            if (number_ == 1 && wire == 2) {
                *active = 1;
                break;
            }
        }
        return 0;
    }
    default:
        return 0;
    }
}

/* --- Timestamp ---------------------------------------------------------------------------------------------------- */

static int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

/* A Timestamp as orjson writes a naive datetime ("YYYY-MM-DDTHH:MM:SS[.ffffff]"), nanoseconds truncated to
 * microseconds as protobuf's ToDatetime does; null when unset (both zero). */
static int timestamp(Out *o, Span ts) {
    In in = {ts.p, ts.p + ts.n};
    uint32_t number_, wire;
    const uint8_t *payload;
    size_t len = 0;
    uint64_t scalar = 0;
    int64_t seconds = 0;
    int32_t nanos = 0;
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &payload, &len, &scalar) < 0) return -1;
        if ((number_ != 1 && number_ != 2) || wire != 0) continue;
        if (number_ == 1) seconds = (int64_t)scalar;
        else nanos = (int32_t)(uint32_t)scalar;
    }
    if (!seconds && !nanos) return PUT(o, "null");
    const int64_t first = -62135596800LL, last = 253402300799LL; /* 0001-01-01 and 9999-12-31T23:59:59 */
    if (seconds < first - 1 || seconds > last + 1) return fail("a timestamp outside the years 1 to 9999");
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
    char text[40];
    int n = snprintf(text, sizeof text, "\"%04d-%02d-%02dT%02d:%02d:%02d", (int)year, (int)month, (int)day,
                     (int)(second / 3600), (int)(second / 60 % 60), (int)(second % 60));
    if (micro) n += snprintf(text + n, sizeof text - n, ".%06d", (int)micro);
    text[n++] = '"';
    return put(o, text, (size_t)n);
}

/* --- DirectoryUser ------------------------------------------------------------------------------------------------ */

static int span_order(const void *a, const void *b) {
    const Span *x = a, *y = b;
    size_t n = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->p, y->p, n);
    if (c) return c;
    return x->n < y->n ? -1 : x->n > y->n;
}

static int group_ref(Out *o, const uint8_t *p, size_t n) {
    In in = {p, p + n};
    uint32_t number_, wire;
    const uint8_t *payload;
    size_t len = 0;
    uint64_t scalar;
    Span id = {(const uint8_t *)"", 0}, name = {(const uint8_t *)"", 0};
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &payload, &len, &scalar) < 0) return -1;
        if ((number_ != 1 && number_ != 2) || wire != 2) continue;
        if (number_ == 1) id = (Span){payload, len};
        else name = (Span){payload, len};
    }
    if (PUT(o, "{\"id\":") < 0 || string(o, id.p, id.n) < 0 || PUT(o, ",\"name\":") < 0 ||
        string(o, name.p, name.n) < 0)
        return -1;
    return PUT(o, "}");
}

static int user(Out *o, const uint8_t *p, size_t n, Span organization, Span directory) {
    In in = {p, p + n};
    uint32_t number_, wire;
    const uint8_t *payload;
    size_t len = 0;
    uint64_t scalar;
    const Span empty = {(const uint8_t *)"", 0};
    /* the string fields by number: 1 id, 2 email, 3 preferred_username, 4 given_name, 5 family_name */
    Span text[6] = {empty, empty, empty, empty, empty, empty};
    Spans updated, emails, groups, detail;
    uint8_t *updated_owned = NULL, *detail_owned = NULL;
    int rc = -1, active;
    spans_init(&updated);
    spans_init(&emails);
    spans_init(&groups);
    spans_init(&detail);
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &payload, &len, &scalar) < 0) goto done;
        if (!((number_ >= 1 && number_ <= 6) || (number_ >= 16 && number_ <= 18)) || wire != 2) continue;
        Spans *into = number_ == 6 ? &updated : number_ == 16 ? &emails : number_ == 17 ? &groups
                    : number_ == 18 ? &detail : NULL;
        if (into) {
            if (spans_push(into, payload, len) < 0) goto done;
        } else {
            text[number_] = (Span){payload, len};
        }
    }
    Span updated_at, user_detail;
    if (merged(&updated, &updated_at, &updated_owned) < 0 || merged(&detail, &user_detail, &detail_owned) < 0)
        goto done;
    if (detail_active(user_detail, &active) < 0) goto done;
    qsort(emails.v, emails.count, sizeof(Span), span_order);
    if (PUT(o, "{\"user_id\":") < 0 || string(o, text[1].p, text[1].n) < 0 ||
        PUT(o, ",\"organization_id\":") < 0 || string(o, organization.p, organization.n) < 0 ||
        PUT(o, ",\"directory_id\":") < 0 || string(o, directory.p, directory.n) < 0 ||
        PUT(o, ",\"email\":") < 0 || string(o, text[2].p, text[2].n) < 0 ||
        PUT(o, ",\"given_name\":") < 0 || string(o, text[4].p, text[4].n) < 0 ||
        PUT(o, ",\"family_name\":") < 0 || string(o, text[5].p, text[5].n) < 0 ||
        PUT(o, ",\"preferred_username\":") < 0 || string(o, text[3].p, text[3].n) < 0 ||
        (active ? PUT(o, ",\"active\":true") : PUT(o, ",\"active\":false")) < 0 || PUT(o, ",\"emails\":[") < 0)
        goto done;
    for (size_t i = 0; i < emails.count; i++)
        if ((i && PUT(o, ",") < 0) || string(o, emails.v[i].p, emails.v[i].n) < 0) goto done;
    if (PUT(o, "],\"groups\":[") < 0) goto done;
    for (size_t i = 0; i < groups.count; i++)
        if ((i && PUT(o, ",") < 0) || group_ref(o, groups.v[i].p, groups.v[i].n) < 0) goto done;
    if (PUT(o, "],\"updated_at\":") < 0 || timestamp(o, updated_at) < 0 || PUT(o, ",\"detail\":") < 0 ||
        struct_(o, user_detail.p, user_detail.n, 0) < 0)
        goto done;
    rc = PUT(o, "}\n");
done:
    PyMem_Free(updated_owned);
    PyMem_Free(detail_owned);
    spans_free(&updated);
    spans_free(&emails);
    spans_free(&groups);
    spans_free(&detail);
    return rc;
}

/* --- entry points ------------------------------------------------------------------------------------------------- */

static PyObject *struct_json(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer buffer;
    if (PyObject_GetBuffer(arg, &buffer, PyBUF_SIMPLE) < 0) return NULL;
    Out out = {NULL, 0, 0};
    PyObject *result = NULL;
    if (struct_(&out, buffer.buf, (size_t)buffer.len, 0) == 0)
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
    Out out = {NULL, 0, 0};
    uint32_t number_, wire;
    const uint8_t *payload;
    size_t len = 0;
    uint64_t scalar;
    Span token = {(const uint8_t *)"", 0};
    Py_ssize_t count = 0;
    PyObject *result = NULL;
    while (in.p < in.end) {
        if (field(&in, &number_, &wire, &payload, &len, &scalar) < 0) goto failed;
        if ((number_ != 1 && number_ != 3) || wire != 2) continue;
        if (number_ == 3) {
            token = (Span){payload, len};
            continue;
        }
        if (user(&out, payload, len, org, dir) < 0) goto failed;
        count++;
    }
    if (!utf8_valid(token)) {
        fail("a next_page_token that is not UTF-8");
        goto failed;
    }
    PyObject *lines = PyBytes_FromStringAndSize(out.data ? out.data : "", (Py_ssize_t)out.len);
    if (lines) result = Py_BuildValue("(Nns#)", lines, count, (const char *)token.p, (Py_ssize_t)token.n);
    goto done;
failed:
    failed_reading("ListDirectoryUsersResponse");
done:
    PyMem_Free(out.data);
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
