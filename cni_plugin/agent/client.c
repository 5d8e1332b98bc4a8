/*
 * The compiled exec'd client: what containerd runs as /opt/cni/bin/pybridge (and pyipam).
 *
 * It speaks cni_plugin/agent/wire.py's protocol: forwards CNI_* env, stdin and the netns fds
 * (SCM_RIGHTS) to the resident agent and relays its answer. When no agent accepts the call it
 * execs the Python launcher in FALLBACK_DIR with the same argv and stdin, which serves the
 * call in-process. Starting this takes ~1 ms against ~11 ms for the Python launcher.
 * Built from source by `python -m cni_plugin.install` (gcc); never committed as a binary.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef FALLBACK_DIR
#define FALLBACK_DIR "/opt/pybridge/libexec"
#endif
#if !defined(VERSION_HEAD) || !defined(VERSION_TAIL) || !defined(VERSION_CURRENT)
#error "build with cni_plugin.install.build_client: the VERSION answer comes from the Python skel"
#endif
/* The protocol's constants come from agent/wire.py at build time (install.wire_defines), as
 * WIRE_*: magics, flags, limits, header size, deadlines (wire.py's: not acknowledged in time,
 * serve in-process; not answered, an error), the socket and the variables naming it. */
#if !defined(WIRE_REQUEST) || !defined(WIRE_ANSWER_TIMEOUT_MS)
#error "build with cni_plugin.install.build_client: the wire constants come from agent/wire.py"
#endif

extern char **environ;

/* forward.py's AGENT_FAILED and AGENT_LATE, byte for byte (tests/unit/agent/test_wire.py compares). */
static const char AGENT_FAILED[] =
    "{\"code\": 999, \"msg\": \"pybridge agent failed while serving the call\", "
    "\"details\": \"see the agent log; the call may have been partly done\"}";
static const char AGENT_LATE[] =
    "{\"code\": 999, \"msg\": \"pybridge agent did not answer in time\", "
    "\"details\": \"see the agent log; the call may have been partly done\"}";

struct buf { char *data; size_t len, cap; };

static int grow(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static int append(struct buf *b, const void *data, size_t len) {
    if (grow(b, len)) return -1;
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

static int append_u32(struct buf *b, uint32_t v) {
    unsigned char le[4] = {v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, (v >> 24) & 0xff};
    return append(b, le, 4);
}

static uint32_t read_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int read_stdin(struct buf *b) {
    for (;;) {
        if (grow(b, 65536)) return -1;
        ssize_t n = read(0, b->data + b->len, 65536);
        if (n == 0) return 0;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        b->len += (size_t)n;
        if (b->len > WIRE_MAX_STDIN) return -1;
    }
}

static int write_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for `events`; -1 with errno ETIMEDOUT once the deadline passed. */
static int wait_ready(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (n > 0) return 0;
        if (n < 0 && errno != EINTR) return -1;
    }
}

/* The socket is non-blocking: every send (or receive) waits at most until `deadline`. */
static int transfer_by(int fd, char *p, size_t len, long long deadline, int sending) {
    while (len) {
        ssize_t n = sending ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
        if (n == 0 && !sending) return -1;
        if (n < 0) {
            if (errno == EINTR) continue;
            if ((errno != EAGAIN && errno != EWOULDBLOCK) ||
                wait_ready(fd, sending ? POLLOUT : POLLIN, deadline))
                return -1;
            continue;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int send_by(int fd, const char *data, size_t len, long long deadline) {
    return transfer_by(fd, (char *)data, len, deadline, 1);
}

static int recv_by(int fd, void *dst, size_t len, long long deadline) {
    return transfer_by(fd, dst, len, deadline, 0);
}

static long long answer_timeout_ms(void) {
    const char *raw = getenv(WIRE_ANSWER_TIMEOUT_ENV);
    char *end;
    double seconds = raw && *raw ? strtod(raw, &end) : 0;
    if (!raw || !*raw || *end || !(seconds > 0 && seconds < 86400)) return WIRE_ANSWER_TIMEOUT_MS;
    return (long long)(seconds * 1000);
}

/* No agent took the call: serve it in-process through the Python launcher, stdin replayed. */
static void fallback(const char *program, char **argv, const struct buf *in) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", FALLBACK_DIR, program);
    if (in) {
        int mfd = memfd_create("pybridge-stdin", 0);
        if (mfd < 0 || write_all(mfd, in->data, in->len) || lseek(mfd, 0, SEEK_SET) < 0 ||
            dup2(mfd, 0) < 0) {
            perror("pybridge: replaying stdin");
            exit(1);
        }
        close(mfd);
    }
    setenv(WIRE_SOCKET_ENV, "", 1); /* the launcher must not ask the agent again */
    execv(path, argv);
    fprintf(stderr, "pybridge: cannot exec %s: %s\n", path, strerror(errno));
    printf("{\"code\": 999, \"msg\": \"pybridge fallback missing\", \"details\": \"%s\"}", path);
    exit(1);
}

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* A JSON string without escapes, of printable ASCII only (json.dumps writes it back as is). */
static const char *plain_string(const char *p, const char *end, const char **s, size_t *n) {
    if (p >= end || *p != '"') return NULL;
    const char *start = ++p;
    for (; p < end && *p != '"'; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e || *p == '\\') return NULL;
    if (p >= end) return NULL;
    *s = start;
    *n = (size_t)(p - start);
    return p + 1;
}

/* The cniVersion that VERSION's stdin asks for, read as skel._version_reply reads it, but only
 * for the forms where that reading is certain: nothing (not JSON: the current version) or one
 * flat object of plain string members, as libcni sends ({"cniVersion":"1.1.0"}). Returns 0 for
 * anything else, which goes the usual way (agent or Python). */
static int version_asked(const struct buf *in, const char **asked, size_t *len) {
    const char *p = skip_ws(in->data, in->data + in->len), *end = in->data + in->len;
    *asked = VERSION_CURRENT;
    *len = strlen(VERSION_CURRENT);
    if (p == end) return 1;
    if (*p++ != '{') return 0;
    p = skip_ws(p, end);
    if (p < end && *p == '}') return skip_ws(p + 1, end) == end;
    for (;;) {
        const char *key, *value;
        size_t klen, vlen;
        if (!(p = plain_string(p, end, &key, &klen))) return 0;
        p = skip_ws(p, end);
        if (p >= end || *p++ != ':') return 0;
        if (!(p = plain_string(skip_ws(p, end), end, &value, &vlen))) return 0;
        if (klen == 10 && memcmp(key, "cniVersion", 10) == 0) { /* the last one wins, as in json */
            *asked = vlen ? value : VERSION_CURRENT;
            *len = vlen ? vlen : strlen(VERSION_CURRENT);
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        return p < end && *p == '}' && skip_ws(p + 1, end) == end;
    }
}

/* VERSION without Python and without the agent: runtimes exec it on every load of a conflist. */
static void answer_version(const struct buf *in) {
    const char *asked;
    size_t len;
    if (!version_asked(in, &asked, &len)) return;
    if (write_all(1, VERSION_HEAD, sizeof VERSION_HEAD - 1) || write_all(1, asked, len) ||
        write_all(1, VERSION_TAIL, sizeof VERSION_TAIL - 1))
        exit(1);
    exit(0);
}

static void failed_after_accept(void) {
    if (errno == ETIMEDOUT) write_all(1, AGENT_LATE, sizeof AGENT_LATE - 1);
    else write_all(1, AGENT_FAILED, sizeof AGENT_FAILED - 1);
    exit(1);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN); /* an agent gone mid-send is an error we handle, not a kill */
    const char *program = basename(argv[0]);
    if (strcmp(program, "pyipam") != 0) program = "pybridge";
    const char *command = getenv("CNI_COMMAND");
    if (!command || !*command || argc > 1) fallback(program, argv, NULL);

    struct buf in = {0}, req = {0}, env = {0};
    if (read_stdin(&in)) fallback(program, argv, &in);
    if (strcmp(command, "VERSION") == 0) answer_version(&in);

    const char *path = getenv(WIRE_SOCKET_ENV);
    if (!path || !*path) path = WIRE_DEFAULT_SOCKET;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) fallback(program, argv, &in);
    strcpy(addr.sun_path, path);
    long long deadline = now_ms() + WIRE_ACK_TIMEOUT_MS;
    /* Non-blocking: a full backlog is EAGAIN (serve in-process), never a wait. */
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) fallback(program, argv, &in);

    int fds[3], nfds = 0;
    uint32_t flags = 0;
    fds[nfds] = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (fds[nfds] < 0) fallback(program, argv, &in);
    nfds++;
    const char *netns = getenv("CNI_NETNS");
    if (netns && *netns) {
        /* O_PATH: never blocks on a FIFO nor opens a device; the agent checks it is a netns. */
        int fd = open(netns, O_PATH | O_CLOEXEC);
        if (fd >= 0) {
            fds[nfds++] = fd;
            flags |= WIRE_FLAG_POD_NETNS;
        }
    }
    /* Our view of the files: the agent serves the call only if it sees the same (views.py). */
    fds[nfds] = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fds[nfds] < 0) fallback(program, argv, &in);
    nfds++;
    flags |= WIRE_FLAG_ROOT;

    for (char **e = environ; *e; e++) {
        if (env.len && append(&env, "", 1)) return 1;
        if (append(&env, *e, strlen(*e))) return 1;
    }
    if (append(&req, WIRE_REQUEST, 4) || append_u32(&req, flags) || append_u32(&req, strlen(program)) ||
        append_u32(&req, env.len) || append_u32(&req, in.len) || append(&req, program, strlen(program)) ||
        append(&req, env.data, env.len) || append(&req, in.data, in.len))
        return 1;

    struct iovec iov = {.iov_base = req.data, .iov_len = req.len};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
    ssize_t sent;
    for (;;) {
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent >= 0) break;
        if (errno == EINTR) continue;
        if ((errno != EAGAIN && errno != EWOULDBLOCK) || wait_ready(sock, POLLOUT, deadline))
            fallback(program, argv, &in);
    }
    /* The rest of a large request: the agent has not accepted yet, so falling back is safe. */
    if ((size_t)sent < req.len && send_by(sock, req.data + sent, req.len - (size_t)sent, deadline))
        fallback(program, argv, &in);
    for (int i = 0; i < nfds; i++) close(fds[i]);

    char answer[4];
    if (recv_by(sock, answer, 4, deadline) || memcmp(answer, WIRE_ACCEPTED, 4) != 0) fallback(program, argv, &in);
    /* Confirm: from here the call is the agent's. Had this failed, the agent never saw it. */
    if (send_by(sock, WIRE_GO, 4, deadline)) fallback(program, argv, &in);
    deadline = now_ms() + answer_timeout_ms();
    unsigned char header[WIRE_RESPONSE_HEADER_LEN];
    errno = 0;
    if (recv_by(sock, header, sizeof header, deadline) || memcmp(header, WIRE_RESPONSE, 4) != 0) failed_after_accept();
    uint32_t code = read_u32(header + 4), olen = read_u32(header + 8), elen = read_u32(header + 12);
    char *body = malloc((size_t)olen + elen + 1);
    if (!body || recv_by(sock, body, (size_t)olen + elen, deadline)) failed_after_accept();
    if (write_all(1, body, olen) || (elen && write_all(2, body + olen, elen))) return 1;
    return (int)code;
}
