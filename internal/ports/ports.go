// Package ports finds free loopback ports for tests and the demo.
package ports

import (
	"fmt"
	"net"
)

// FreePair returns host:p where TCP p and TCP and UDP p+1 are free now: a
// peer address and its gossip port.
func FreePair(host string) (string, error) {
	for i := 0; i < 100; i++ {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return "", err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		next := net.JoinHostPort(host, fmt.Sprint(p+1))
		l2, err := net.Listen("tcp", next)
		if err != nil {
			continue
		}
		u, err := net.ListenPacket("udp", next)
		l2.Close()
		if err != nil {
			continue
		}
		u.Close()
		return net.JoinHostPort(host, fmt.Sprint(p)), nil
	}
	return "", fmt.Errorf("ports: no free pair on %s", host)
}
