"""The floor under the NSQ client and the embedded broker: what both ends of an NSQ connection share.

``protocol`` holds the facts of NSQ TCP protocol V2, ``errors`` almanet's
error root and the protocol's errors, ``addresses`` the ``host:port``
parser, ``compression`` the snappy and deflate streams IDENTIFY negotiates. The
codec (``almanet._speedups.frames``) builds on it; ``almanet.nsq`` and
``almanet.broker`` build on both, never on each other.
"""
