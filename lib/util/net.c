/*
 * TCP socket options that both QEMU clients need (lib/qmp, the copier).
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "util.h"

bool util_is_tcp(int fd)
{
    int domain = 0;
    socklen_t len = sizeof(domain);

    return getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
           (domain == AF_INET || domain == AF_INET6);
}

void util_quick_ack(int fd)
{
    int one = 1;

    setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
}
