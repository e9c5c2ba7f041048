/*
 * wschurn: the WebSocket churn load generator of `make bench` (scenario 5 and its references).
 *
 * Why C: wrk is C for the same reason. On this 2-core machine the load generator shares the
 * cores with Envoy, extauth, valkey and the upstream; a Python client spent about 0.8 ms of CPU
 * per cycle, a quarter of what the whole machine spends per upgrade. bench/run.py builds this
 * file with the system C compiler.
 *
 * Each of --concurrency lanes loops until --duration has passed: connect, the upgrade
 * (timed from connect() to the 101), one masked text frame "x", its echo read back, a
 * masked close frame, the server's close read, TCP close. Every connection sends a fresh
 * random Sec-WebSocket-Key, and a 101 whose Sec-WebSocket-Accept is not the RFC 6455 value
 * for that key counts as status 0 (not an upgrade). Non-blocking sockets on one epoll.
 *
 * Usage: wschurn --host H --port P --path /ws --origin O --tokens tokens.json
 *                [--concurrency N] [--duration S] [--offset K]
 * tokens.json is a JSON list of strings (JWTs: no escapes); connection i of lane l uses
 * token (offset + l + i * concurrency) mod len.
 * Output: one JSON line: elapsed, upgrades, cycles, statuses, errors, latencies_us.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "rfc6455.h"

#define CYCLE_TIMEOUT_S 10.0
#define RETRY_DELAY_S 0.005
#define BUF_SIZE 4096
#define MAX_STATUS 600

/* ---- randomness: keys and masks come from the kernel, refilled in blocks ----------------- */

static uint8_t rnd_pool[4096];
static size_t rnd_left = 0;

static void rnd(uint8_t *out, size_t n) {
    if (rnd_left < n) {
        if (getrandom(rnd_pool, sizeof rnd_pool, 0) != (ssize_t)sizeof rnd_pool) { perror("getrandom"); exit(2); }
        rnd_left = sizeof rnd_pool;
    }
    memcpy(out, rnd_pool + sizeof rnd_pool - rnd_left, n);
    rnd_left -= n;
}

/* ---- results ---------------------------------------------------------------------------- */

static long statuses[MAX_STATUS + 1];
static const char *error_names[] = {"connect_error", "connection_lost", "refused", "bad_echo",
                                    "bad_frame", "timeout", "send_error"};
enum { E_CONNECT, E_LOST, E_REFUSED, E_ECHO, E_FRAME, E_TIMEOUT, E_SEND, E_COUNT };
static long errors[E_COUNT];
static long upgrades, cycles;
static uint32_t *latencies;
static size_t n_lat, cap_lat;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void record_latency(double seconds) {
    if (n_lat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 65536;
        latencies = realloc(latencies, cap_lat * sizeof *latencies);
        if (!latencies) { perror("realloc"); exit(2); }
    }
    latencies[n_lat++] = (uint32_t)(seconds * 1e6 + 0.5);
}

/* ---- one lane --------------------------------------------------------------------------- */

enum state { IDLE, CONNECTING, RESPONSE, FRAMES };

struct lane {
    int id, fd;
    enum state st;
    long n;           /* cycles started on this lane */
    double started;   /* connect() time of the current cycle */
    double wake;      /* IDLE: when to start the next cycle */
    char accept[32];  /* the Sec-WebSocket-Accept this cycle expects */
    uint8_t buf[BUF_SIZE];
    size_t len;
};

static struct {
    const char *host, *path, *origin, *tokens_file;
    int port, concurrency;
    double duration;
    long offset;
} opt = {"127.0.0.1", "/ws", NULL, NULL, 0, 16, 10.0, 0};

static char **tokens;
static size_t n_tokens;
static int ep;
static struct sockaddr_in addr;
static double deadline;

static void load_tokens(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    static char data[1 << 22];
    size_t n = fread(data, 1, sizeof data - 1, f);
    fclose(f);
    data[n] = 0;
    size_t cap = 256;
    tokens = malloc(cap * sizeof *tokens);
    for (char *p = strchr(data, '"'); p; p = strchr(p + 1, '"')) {
        char *end = strchr(p + 1, '"');
        if (!end) break;
        *end = 0;
        if (n_tokens == cap) tokens = realloc(tokens, (cap *= 2) * sizeof *tokens);
        tokens[n_tokens++] = p + 1;
        p = end;
    }
    if (!n_tokens) { fprintf(stderr, "%s: no tokens\n", path); exit(2); }
}

static void fail(struct lane *l, int err);

static void masked_frame(uint8_t *out, uint8_t first, const uint8_t *payload, size_t n) {
    out[0] = first;
    out[1] = (uint8_t)(0x80 | n);
    rnd(out + 2, 4);
    for (size_t i = 0; i < n; i++) out[6 + i] = payload[i] ^ out[2 + i % 4];
}

static int send_all(struct lane *l, const void *data, size_t n) {
    /* Every message here is far below the socket buffer: one send() takes it whole. */
    ssize_t w = send(l->fd, data, n, MSG_NOSIGNAL);
    if (w != (ssize_t)n) { fail(l, E_SEND); return -1; }
    return 0;
}

static void end_cycle(struct lane *l, double delay) {
    if (l->fd >= 0) { close(l->fd); l->fd = -1; }  /* close() also drops it from the epoll set */
    l->st = IDLE;
    l->len = 0;
    l->wake = now_s() + delay;
}

static void fail(struct lane *l, int err) {
    errors[err]++;
    end_cycle(l, RETRY_DELAY_S);
}

static void start_cycle(struct lane *l) {
    l->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (l->fd < 0) { perror("socket"); exit(2); }
    int one = 1;
    setsockopt(l->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    l->started = now_s();
    l->st = CONNECTING;
    l->len = 0;
    if (connect(l->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        fail(l, E_CONNECT);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = l};
    epoll_ctl(ep, EPOLL_CTL_ADD, l->fd, &ev);
}

static void send_upgrade(struct lane *l) {
    uint8_t key_raw[16];
    char key[32];
    rnd(key_raw, sizeof key_raw);
    ws_accept(key, b64(key_raw, sizeof key_raw, key), l->accept);
    const char *tok = tokens[(size_t)(opt.offset + l->id + l->n * opt.concurrency) % n_tokens];
    char req[BUF_SIZE];
    int len = snprintf(req, sizeof req,
                       "GET %s?token=%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nOrigin: %s\r\n"
                       "Sec-WebSocket-Key: %s\r\n\r\n",
                       opt.path, tok, opt.host, opt.port, opt.origin, key);
    if (len <= 0 || len >= (int)sizeof req) { fprintf(stderr, "request too long\n"); exit(2); }
    l->n++;
    if (send_all(l, req, (size_t)len) < 0) return;
    l->st = RESPONSE;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
    epoll_ctl(ep, EPOLL_CTL_MOD, l->fd, &ev);
}

static void on_frames(struct lane *l) {
    size_t off = 0;
    while (l->len - off >= 2) {
        uint8_t b0 = l->buf[off], n = l->buf[off + 1] & 0x7F;
        if (n >= 126 || (l->buf[off + 1] & 0x80)) { fail(l, E_FRAME); return; }  /* echo and close are short, unmasked */
        if (l->len - off < 2u + n) break;
        uint8_t opcode = b0 & 0x0F;
        const uint8_t *payload = l->buf + off + 2;
        off += 2u + n;
        if (opcode == 0x1) {
            uint8_t frame[8], code[2] = {0x03, 0xE8};  /* 1000: normal closure */
            if (n != 1 || payload[0] != 'x') { fail(l, E_ECHO); return; }
            masked_frame(frame, 0x88, code, 2);
            if (send_all(l, frame, 8) < 0) return;
        } else if (opcode == 0x8) {
            cycles++;
            end_cycle(l, 0);
            return;
        } else {
            fail(l, E_FRAME);
            return;
        }
    }
    memmove(l->buf, l->buf + off, l->len - off);
    l->len -= off;
}

static void on_response(struct lane *l) {
    uint8_t *end = memmem(l->buf, l->len, "\r\n\r\n", 4);
    if (!end) {
        if (l->len == BUF_SIZE) fail(l, E_FRAME);
        return;
    }
    *end = 0;
    char *head = (char *)l->buf;
    int status = 0;
    if (sscanf(head, "HTTP/1.%*c %d", &status) != 1 || status < 0 || status > MAX_STATUS) status = 0;
    size_t vlen = 0;
    const char *acc = http_header(head, "sec-websocket-accept", &vlen);
    if (status == 101 && !(acc && vlen == strlen(l->accept) && memcmp(acc, l->accept, vlen) == 0))
        status = 0;  /* a 101 without the right accept value is not an upgrade */
    statuses[status]++;
    if (status != 101) {
        errors[E_REFUSED]++;
        end_cycle(l, RETRY_DELAY_S);
        return;
    }
    record_latency(now_s() - l->started);
    upgrades++;
    size_t used = (size_t)(end + 4 - l->buf);
    memmove(l->buf, l->buf + used, l->len - used);
    l->len -= used;
    l->st = FRAMES;
    uint8_t frame[7];
    masked_frame(frame, 0x81, (const uint8_t *)"x", 1);
    if (send_all(l, frame, sizeof frame) < 0) return;
    on_frames(l);
}

static void on_event(struct lane *l, uint32_t events) {
    if (l->st == CONNECTING) {
        int err = 0;
        socklen_t elen = sizeof err;
        getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &err, &elen);
        if (err || (events & (EPOLLERR | EPOLLHUP))) { fail(l, E_CONNECT); return; }
        send_upgrade(l);
        return;
    }
    ssize_t r = recv(l->fd, l->buf + l->len, BUF_SIZE - l->len, 0);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (r <= 0) { fail(l, E_LOST); return; }
    l->len += (size_t)r;
    if (l->st == RESPONSE) on_response(l);
    else if (l->st == FRAMES) on_frames(l);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) opt.host = v;
        else if (!strcmp(k, "--port")) opt.port = atoi(v);
        else if (!strcmp(k, "--path")) opt.path = v;
        else if (!strcmp(k, "--origin")) opt.origin = v;
        else if (!strcmp(k, "--tokens")) opt.tokens_file = v;
        else if (!strcmp(k, "--concurrency")) opt.concurrency = atoi(v);
        else if (!strcmp(k, "--duration")) opt.duration = atof(v);
        else if (!strcmp(k, "--offset")) opt.offset = atol(v);
        else { fprintf(stderr, "unknown option %s\n", k); exit(2); }
    }
    if (!opt.port || !opt.origin || !opt.tokens_file || opt.concurrency < 1) {
        fprintf(stderr, "usage: wschurn --host H --port P --path /ws --origin O --tokens F "
                        "[--concurrency N] [--duration S] [--offset K]\n");
        exit(2);
    }
}

static void print_result(double elapsed) {
    printf("{\"elapsed\": %.6f, \"upgrades\": %ld, \"cycles\": %ld, \"statuses\": {", elapsed, upgrades, cycles);
    const char *sep = "";
    for (int s = 0; s <= MAX_STATUS; s++)
        if (statuses[s]) { printf("%s\"%d\": %ld", sep, s, statuses[s]); sep = ", "; }
    printf("}, \"errors\": {");
    sep = "";
    for (int e = 0; e < E_COUNT; e++)
        if (errors[e]) { printf("%s\"%s\": %ld", sep, error_names[e], errors[e]); sep = ", "; }
    printf("}, \"latencies_us\": [");
    for (size_t i = 0; i < n_lat; i++) printf(i ? ", %u" : "%u", latencies[i]);
    printf("]}\n");
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    load_tokens(opt.tokens_file);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1) { fprintf(stderr, "--host must be an IPv4 address\n"); exit(2); }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct lane *lanes = calloc((size_t)opt.concurrency, sizeof *lanes);
    double started = now_s();
    deadline = started + opt.duration;
    for (int i = 0; i < opt.concurrency; i++) {
        lanes[i].id = i;
        lanes[i].fd = -1;
        start_cycle(&lanes[i]);
    }
    struct epoll_event evs[256];
    for (;;) {
        double t = now_s(), next = t + 0.1;
        int busy = 0;
        for (int i = 0; i < opt.concurrency; i++) {
            struct lane *l = &lanes[i];
            if (l->st == IDLE && t < deadline && t >= l->wake) start_cycle(l);
            else if (l->st != IDLE && t - l->started > CYCLE_TIMEOUT_S) fail(l, E_TIMEOUT);
            if (l->st == IDLE && t < deadline && l->wake < next) next = l->wake;  /* a failed cycle's retry */
            busy += l->st != IDLE || t < deadline;
        }
        if (!busy) break;
        int wait_ms = next <= t ? 0 : (int)((next - t) * 1000) + 1;
        int n = epoll_wait(ep, evs, 256, wait_ms);
        for (int i = 0; i < n; i++) {
            struct lane *l = evs[i].data.ptr;
            if (l->fd >= 0) on_event(l, evs[i].events);
        }
    }
    print_result(now_s() - started);
    return 0;
}
