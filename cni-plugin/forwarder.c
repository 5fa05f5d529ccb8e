/*
 * meshnet-cni: the CNI plugin executable on the node, a forwarder to `meshnet cni agent`.
 *
 * The runtime starts it once per call (CNI_* in the environment, the netconf on stdin). It
 * answers VERSION itself, and otherwise sends the call to the resident agent over the Unix
 * socket <cni_agent_run_dir>/meshnet-cni.sock (the directory comes from the netconf, default
 * /var/run/meshnet-cni) and relays the agent's stdout and exit code. It holds no plugin logic.
 *
 * When the agent cannot be reached (no socket, nobody listening, or the connection closed
 * before the agent took the call), it execs the standalone Python plugin installed beside
 * it, <directory of this executable, links resolved>/meshnet-cni-standalone/meshnet-cni,
 * with the same environment and the netconf on stdin, and says so in a log line on stderr.
 * Once the agent has taken the call, a broken connection is a CNI error (code 999): the call
 * may be half done, and the runtime retries or cleans up with DEL.
 *
 * Wire format (integers big-endian u32), the same as meshnet/cni/wire.py:
 *   request: "MCA1", N, then N fields (length, bytes): the command, every "NAME=value" of the
 *            environment, and last stdin.
 *   reply:   "A" once the call is taken, then exit code, stdout length, stdout.
 *
 * Build: gcc -static -Os -o meshnet-cni forwarder.c   (no runtime dependencies)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_RUN_DIR "/var/run/meshnet-cni"
#define SOCKET_NAME "meshnet-cni.sock"
#define FALLBACK "meshnet-cni-standalone/meshnet-cni"
#define ERR_INTERNAL 999
#define CONNECT_TIMEOUT_SECONDS 5

extern char **environ;

static const char VERSION_JSON[] =
    "{\n"
    "    \"cniVersion\": \"1.1.0\",\n"
    "    \"supportedVersions\": [\n"
    "        \"0.1.0\",\n"
    "        \"0.2.0\",\n"
    "        \"0.3.0\",\n"
    "        \"0.3.1\",\n"
    "        \"0.4.0\",\n"
    "        \"1.0.0\",\n"
    "        \"1.1.0\"\n"
    "    ]\n"
    "}\n";
static const char USAGE[] =
    "CNI plugin meshnet-cni: supported versions 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0\n";

struct buffer {
    char *data;
    size_t len, cap;
};

static void append(struct buffer *b, const void *data, size_t len) {
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + len + 1 > cap) cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) {
            fputs("meshnet-cni: out of memory\n", stderr);
            exit(1);
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
}

static void append_u32(struct buffer *b, uint32_t value) {
    unsigned char raw[4] = {value >> 24, value >> 16, value >> 8, value};
    append(b, raw, 4);
}

static int write_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* To the agent: MSG_NOSIGNAL, so an agent that closes early is an error here (and the call
 * falls back), not a SIGPIPE that kills the forwarder without an answer. */
static int send_all(int sock, const char *data, size_t len) {
    while (len) {
        ssize_t n = send(sock, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int read_stdin(struct buffer *b) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(0, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) return 0;
        append(b, chunk, (size_t)n);
    }
}

/* ---- just enough JSON: a top-level string field of the netconf ---------------------------- */

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* Past the string starting at p (on its opening quote); NULL when unterminated. */
static const char *skip_string(const char *p, const char *end) {
    for (p++; p < end; p++) {
        if (*p == '\\') p++;
        else if (*p == '"') return p + 1;
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *end) {
    if (p >= end) return NULL;
    if (*p == '"') return skip_string(p, end);
    int depth = 0;
    while (p < end) {
        if (*p == '"') {
            p = skip_string(p, end);
            if (!p) return NULL;
            continue;
        }
        if (*p == '{' || *p == '[') depth++;
        else if (*p == '}' || *p == ']') {
            if (depth == 0) return p;
            if (--depth == 0) return p + 1;
        } else if (*p == ',' && depth == 0) return p;
        p++;
    }
    return depth == 0 ? p : NULL;
}

static void put_utf8(struct buffer *out, unsigned code) {
    unsigned char u[3];
    if (code < 0x80) {
        u[0] = code;
        append(out, u, 1);
    } else if (code < 0x800) {
        u[0] = 0xC0 | code >> 6;
        u[1] = 0x80 | (code & 0x3F);
        append(out, u, 2);
    } else {
        u[0] = 0xE0 | code >> 12;
        u[1] = 0x80 | ((code >> 6) & 0x3F);
        u[2] = 0x80 | (code & 0x3F);
        append(out, u, 3);
    }
}

/* Decode the JSON string at p (opening quote) into out; -1 when malformed. */
static int decode_string(const char *p, const char *end, struct buffer *out) {
    for (p++; p < end; p++) {
        if (*p == '"') return 0;
        if (*p != '\\') {
            append(out, p, 1);
            continue;
        }
        if (++p >= end) return -1;
        switch (*p) {
            case '"': case '\\': case '/': append(out, p, 1); break;
            case 'b': append(out, "\b", 1); break;
            case 'f': append(out, "\f", 1); break;
            case 'n': append(out, "\n", 1); break;
            case 'r': append(out, "\r", 1); break;
            case 't': append(out, "\t", 1); break;
            case 'u': {
                char hex[5] = {0};
                if (end - p < 5) return -1;
                memcpy(hex, p + 1, 4);
                char *stop;
                unsigned code = (unsigned)strtoul(hex, &stop, 16);
                if (*stop || (code >= 0xD800 && code < 0xE000)) return -1; /* no surrogates */
                put_utf8(out, code);
                p += 4;
                break;
            }
            default: return -1;
        }
    }
    return -1;
}

/* The top-level string field `key` of the JSON object in text, or NULL (absent, not a string,
 * or not parseable: the agent reports a malformed netconf itself). */
static char *top_level_string(const char *text, size_t len, const char *key) {
    const char *p = text, *end = text + len;
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return NULL;
    p++;
    for (;;) {
        p = skip_ws(p, end);
        if (p >= end || *p != '"') return NULL;
        struct buffer name = {0};
        if (decode_string(p, end, &name) < 0) return free(name.data), NULL;
        p = skip_string(p, end);
        p = p ? skip_ws(p, end) : NULL;
        if (!p || p >= end || *p != ':') return free(name.data), NULL;
        p = skip_ws(p + 1, end);
        int match = name.data && strcmp(name.data, key) == 0;
        free(name.data);
        if (match) {
            struct buffer value = {0};
            if (p >= end || *p != '"' || decode_string(p, end, &value) < 0) {
                free(value.data);
                return NULL;
            }
            if (!value.data) append(&value, "", 0);
            return value.data;
        }
        p = skip_value(p, end);
        if (!p) return NULL;
        p = skip_ws(p, end);
        if (p >= end || *p != ',') return NULL;
        p++;
    }
}

/* ---- errors and the fallback ------------------------------------------------------------- */

static void json_escaped(struct buffer *b, const char *text) {
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (*c == '"' || *c == '\\') {
            append(b, "\\", 1);
            append(b, c, 1);
        } else if (*c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", *c);
            append(b, esc, 6);
        } else {
            append(b, c, 1);
        }
    }
}

static void log_line(const char *level, const char *event, const char *socket_path,
                     const char *error) {
    char stamp[32];
    time_t now = time(NULL);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    struct buffer b = {0};
    append(&b, "{\"event\": \"", 11);
    json_escaped(&b, event);
    append(&b, "\", \"socket\": \"", 14);
    json_escaped(&b, socket_path);
    append(&b, "\", \"error\": \"", 13);
    json_escaped(&b, error);
    append(&b, "\", \"container\": \"", 17);
    json_escaped(&b, getenv("CNI_CONTAINERID") ? getenv("CNI_CONTAINERID") : "");
    append(&b, "\", \"level\": \"", 13);
    json_escaped(&b, level);
    append(&b, "\", \"timestamp\": \"", 17);
    json_escaped(&b, stamp);
    append(&b, "\"}\n", 3);
    write_all(2, b.data, b.len);
    free(b.data);
}

/* The CNI error document on stdout (what the Python plugin prints), exit 1. */
static int cni_error(const char *version, const char *message) {
    struct buffer b = {0};
    append(&b, "{\n    \"cniVersion\": \"", 21);
    json_escaped(&b, version);
    char code[64];
    snprintf(code, sizeof code, "\",\n    \"code\": %d,\n    \"msg\": \"", ERR_INTERNAL);
    append(&b, code, strlen(code));
    json_escaped(&b, message);
    append(&b, "\"\n}\n", 4);
    write_all(1, b.data, b.len);
    free(b.data);
    log_line("error", message, "", "");
    return 1;
}

static int fallback(const struct buffer *input, const char *version, char **argv,
                    const char *socket_path, const char *why) {
    char self[PATH_MAX], message[PATH_MAX + 512];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return cni_error(version, "meshnet-cni: agent unreachable, and /proc/self/exe unreadable");
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (!slash) return cni_error(version, "meshnet-cni: agent unreachable, own path unknown");
    slash[1] = '\0';
    char path[PATH_MAX + sizeof FALLBACK];
    snprintf(path, sizeof path, "%s%s", self, FALLBACK);
    snprintf(message, sizeof message, "meshnet-cni agent unreachable; running the standalone plugin %s", path);
    log_line("warning", message, socket_path, why);
    /* the netconf was read already: hand it on in an anonymous in-memory file */
    int fd = memfd_create("meshnet-cni-stdin", 0);
    if (fd < 0 || write_all(fd, input->data ? input->data : "", input->len) < 0 ||
        lseek(fd, 0, SEEK_SET) < 0 || dup2(fd, 0) < 0) {
        snprintf(message, sizeof message, "meshnet-cni: agent unreachable (%s), and stdin for the standalone plugin failed: %s", why, strerror(errno));
        return cni_error(version, message);
    }
    if (fd != 0) close(fd);
    argv[0] = path;
    execve(path, argv, environ);
    snprintf(message, sizeof message, "meshnet-cni: agent unreachable (%s), and the standalone plugin %s cannot run: %s", why, path, strerror(errno));
    return cni_error(version, message);
}

/* ---- the call ---------------------------------------------------------------------------- */

static int read_exactly(int fd, void *out, size_t len) {
    char *p = out;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) {
            errno = ECONNRESET;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static uint32_t be32(const unsigned char raw[4]) {
    return (uint32_t)raw[0] << 24 | (uint32_t)raw[1] << 16 | (uint32_t)raw[2] << 8 | raw[3];
}

int main(int argc, char **argv) {
    (void)argc;
    const char *command = getenv("CNI_COMMAND");
    if (!command || !*command) {
        fputs(USAGE, stderr);
        return 1;
    }
    if (strcmp(command, "VERSION") == 0) return write_all(1, VERSION_JSON, sizeof VERSION_JSON - 1) ? 1 : 0;

    struct buffer input = {0};
    if (read_stdin(&input) < 0) return cni_error("1.1.0", "meshnet-cni: cannot read stdin");
    char *version = top_level_string(input.data ? input.data : "", input.len, "cniVersion");
    char *run_dir = top_level_string(input.data ? input.data : "", input.len, "cni_agent_run_dir");
    const char *cni_version = version ? version : "1.1.0";
    /* Python's Call.run_dir: an empty value also means the default */
    const char *dir = run_dir && *run_dir ? run_dir : DEFAULT_RUN_DIR;

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char socket_path[PATH_MAX + sizeof SOCKET_NAME + 1];
    snprintf(socket_path, sizeof socket_path, "%s/%s", dir, SOCKET_NAME);
    if (strlen(socket_path) >= sizeof addr.sun_path)
        return fallback(&input, cni_version, argv, socket_path, "socket path too long");
    strcpy(addr.sun_path, socket_path);

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return fallback(&input, cni_version, argv, socket_path, strerror(errno));
    struct timeval limit = {.tv_sec = CONNECT_TIMEOUT_SECONDS}; /* a full backlog blocks connect */
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        const char *why = strerror(errno);
        close(sock);
        return fallback(&input, cni_version, argv, socket_path, why);
    }

    struct buffer request = {0};
    size_t fields = 2;
    for (char **e = environ; *e; e++) fields++;
    append(&request, "MCA1", 4);
    append_u32(&request, (uint32_t)fields);
    append_u32(&request, (uint32_t)strlen(command));
    append(&request, command, strlen(command));
    for (char **e = environ; *e; e++) {
        append_u32(&request, (uint32_t)strlen(*e));
        append(&request, *e, strlen(*e));
    }
    append_u32(&request, (uint32_t)input.len);
    if (input.len) append(&request, input.data, input.len);

    struct timeval none = {0};
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
    char ack = 0;
    if (send_all(sock, request.data, request.len) < 0 || read_exactly(sock, &ack, 1) < 0 ||
        ack != 'A') {
        const char *why = strerror(errno);
        close(sock);
        return fallback(&input, cni_version, argv, socket_path, why);
    }

    unsigned char header[8];
    char message[sizeof socket_path + 256];
    if (read_exactly(sock, header, sizeof header) < 0) {
        snprintf(message, sizeof message, "meshnet-cni: lost the agent's reply on %s: %s", socket_path, strerror(errno));
        return cni_error(cni_version, message);
    }
    uint32_t code = be32(header), length = be32(header + 4);
    char *output = malloc(length ? length : 1);
    if (!output || read_exactly(sock, output, length) < 0) {
        snprintf(message, sizeof message, "meshnet-cni: lost the agent's reply on %s: %s", socket_path, output ? strerror(errno) : "out of memory");
        return cni_error(cni_version, message);
    }
    close(sock);
    if (write_all(1, output, length) < 0) return 1;
    return code > 255 ? 1 : (int)code;
}
