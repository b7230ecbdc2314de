"""membership: who of the cluster's nodes is alive, on which network, and what each says of its modules.

``heartbeat`` is the datagram and its pure codec, ``tracker`` the pure peer tracker (every method takes
``now``), ``events`` what the tracker reports, ``transport`` the UDP sockets and ``memory`` an in-memory
stand-in for tests, and ``endpoint`` the coroutine that pulses and feeds the tracker.
"""
