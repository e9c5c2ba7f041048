/*
 * wsecho: the WebSocket echo upstream of `make bench`.
 *
 * Why C: the same reason as the churn client (bench/wschurn.c). On this 2-core machine the
 * upstream shares the cores with Envoy, extauth, valkey and the load generator; an asyncio
 * upstream spent about 0.3 ms of CPU per connection, more than a tenth of what the whole
 * machine spends per upgrade. A real deployment runs its upstream elsewhere. bench/run.py
 * builds this file with the system C compiler and checks it against a `websockets` client.
 *
 * What it speaks: an HTTP/1.1 upgrade with Sec-WebSocket-Key answered
 * 101 with the RFC 6455 Sec-WebSocket-Accept (an upgrade without a key: 400 and close);
 * text, binary and continuation frames echoed as they came (RSV bits cleared, unmasked);
 * ping answered with pong; a close frame answered with a close frame carrying the same status
 * code, then TCP closed; any other request a keep-alive `200 ok`. One thread, one epoll set,
 * non-blocking sockets, output buffered when the socket is full.
 *
 * Usage: wsecho --port P     (listens on 127.0.0.1; prints "ready" once listening;
 *                             SIGTERM/SIGINT stop it with exit status 0)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rfc6455.h"

#define MAX_HEAD (64 * 1024)          /* an HTTP head larger than this: close */
#define MAX_FRAME (16 * 1024 * 1024)  /* a frame larger than this: close */
#define READ_CHUNK (64 * 1024)

static const char OK[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
static const char BAD[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

struct buf { uint8_t *p; size_t len, cap; };

struct conn {
    int fd;
    int ws;       /* upgraded: frames from here on */
    int closing;  /* close TCP once the output is flushed */
    int want_out; /* EPOLLOUT in the epoll set */
    struct buf in, out;
};

static int ep;
static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static int reserve(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static void drop(struct buf *b, size_t n) {
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
    if (!b->len) {  /* an idle held connection keeps no buffer */
        free(b->p);
        *b = (struct buf){0};
    }
}

static int memmem_ci(const char *hay, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(hay + i, needle, k) == 0) return 1;
    return 0;
}

static void conn_close(struct conn *c) {
    close(c->fd);  /* also drops it from the epoll set */
    free(c->in.p);
    free(c->out.p);
    free(c);
}

/* Ask for EPOLLOUT while output waits, and only then (one epoll_ctl per change, not per event). */
static void watch(struct conn *c) {
    int want = c->out.len > 0;
    if (want == c->want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

/* Send what is queued; 0 when all of it went, 1 when some waits for EPOLLOUT, -1 on error. */
static int flush(struct conn *c) {
    while (c->out.len) {
        ssize_t w = send(c->fd, c->out.p, c->out.len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return 1;
        if (w <= 0) return -1;
        drop(&c->out, (size_t)w);
    }
    return 0;
}

static int put(struct conn *c, const void *data, size_t n) {
    if (reserve(&c->out, n) < 0) return -1;
    memcpy(c->out.p + c->out.len, data, n);
    c->out.len += n;
    return 0;
}

static int put_frame(struct conn *c, uint8_t first, const uint8_t *payload, size_t n) {
    uint8_t head[10];
    size_t hlen = 2;
    head[0] = first;
    if (n < 126) {
        head[1] = (uint8_t)n;
    } else if (n < 65536) {
        head[1] = 126; head[2] = (uint8_t)(n >> 8); head[3] = (uint8_t)n;
        hlen = 4;
    } else {
        head[1] = 127;
        for (int i = 0; i < 8; i++) head[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
        hlen = 10;
    }
    return put(c, head, hlen) < 0 ? -1 : put(c, payload, n);
}

/* Handle the HTTP heads buffered so far; -1 to close the connection. */
static int on_http(struct conn *c) {
    while (!c->ws) {
        uint8_t *end = memmem(c->in.p, c->in.len, "\r\n\r\n", 4);
        if (!end) return c->in.len > MAX_HEAD ? -1 : 0;
        *end = 0;
        char *head = (char *)c->in.p;
        size_t ulen = 0, klen = 0;
        const char *upgrade = http_header(head, "upgrade", &ulen);
        const char *key = http_header(head, "sec-websocket-key", &klen);
        int is_ws = upgrade && memmem_ci(upgrade, ulen, "websocket");
        if (is_ws) {
            char accept[32], resp[256];
            if (!key || ws_accept(key, klen, accept) < 0) { put(c, BAD, sizeof BAD - 1); c->closing = 1; return 0; }
            int n = snprintf(resp, sizeof resp, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                                "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
            if (put(c, resp, (size_t)n) < 0) return -1;
            c->ws = 1;
        } else if (put(c, OK, sizeof OK - 1) < 0) {
            return -1;
        }
        drop(&c->in, (size_t)(end + 4 - c->in.p));
    }
    return 0;
}

/* Handle the frames buffered so far; -1 to close the connection. */
static int on_frames(struct conn *c) {
    while (!c->closing && c->in.len >= 2) {
        uint8_t *b = c->in.p;
        uint64_t n = b[1] & 0x7F;
        size_t pos = 2;
        if (n == 126) {
            if (c->in.len < 4) return 0;
            n = (uint64_t)b[2] << 8 | b[3];
            pos = 4;
        } else if (n == 127) {
            if (c->in.len < 10) return 0;
            n = 0;
            for (int i = 0; i < 8; i++) n = n << 8 | b[2 + i];
            pos = 10;
        }
        if (n > MAX_FRAME) return -1;
        const uint8_t *mask = NULL;
        if (b[1] & 0x80) {
            if (c->in.len < pos + 4) return 0;
            mask = b + pos;
            pos += 4;
        }
        if (c->in.len < pos + n) return 0;
        uint8_t *payload = b + pos;
        if (mask)
            for (size_t i = 0; i < n; i++) payload[i] ^= mask[i % 4];
        uint8_t opcode = b[0] & 0x0F;
        int r = 0;
        if (opcode == 0x8) {  /* close: the same status code back, then TCP closes */
            r = put_frame(c, 0x88, payload, n < 2 ? n : 2);
            c->closing = 1;
        } else if (opcode == 0x9) {
            r = put_frame(c, 0x8A, payload, n);
        } else if (opcode <= 0x2) {
            r = put_frame(c, b[0] & 0x8F, payload, n);
        }
        if (r < 0) return -1;
        drop(&c->in, pos + n);
    }
    return 0;
}

static void on_readable(struct conn *c) {
    static uint8_t chunk[READ_CHUNK];
    ssize_t r;
    do r = recv(c->fd, chunk, sizeof chunk, 0); while (r < 0 && errno == EINTR);
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0 || reserve(&c->in, (size_t)r) < 0) { conn_close(c); return; }
    memcpy(c->in.p + c->in.len, chunk, (size_t)r);
    c->in.len += (size_t)r;
    int bad = c->ws ? 0 : on_http(c);
    if (!bad && c->ws) bad = on_frames(c);  /* frames may follow the head in the same read */
    int f = bad ? -1 : flush(c);
    if (f < 0 || (f == 0 && c->closing)) { conn_close(c); return; }
    watch(c);
}

static void on_accept(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN) perror("accept4");  /* EMFILE and such: the backlog waits */
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) { close(fd); continue; }
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
}

int main(int argc, char **argv) {
    int port = -1;
    if (argc == 3 && !strcmp(argv[1], "--port")) port = atoi(argv[2]);
    if (port < 0 || port > 65535) { fprintf(stderr, "usage: wsecho --port P\n"); return 2; }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) { perror("listen"); return 1; }
    ep = epoll_create1(EPOLL_CLOEXEC);
    static int listener_tag;  /* data.ptr of the listening socket */
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event evs[256];
    while (!stop) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &listener_tag) { on_accept(lfd); continue; }
            struct conn *c = evs[i].data.ptr;
            if (evs[i].events & EPOLLIN) { on_readable(c); continue; }
            int f = flush(c);  /* EPOLLOUT, EPOLLERR or EPOLLHUP */
            if (f < 0 || (evs[i].events & (EPOLLERR | EPOLLHUP)) || (f == 0 && c->closing)) conn_close(c);
            else watch(c);
        }
    }
    return 0;
}
