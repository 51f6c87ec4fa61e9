"""Serving a DVT: the runtime `dvt serve` runs in each replica, in the layers of KServe's Python server.

`protocol`: the Open Inference Protocol (KServe v2) codec, typed requests and responses, no image decoding;
`batching`: the stage-level batcher that runs the engines' public stage contract on batches of several
requests (asyncio and one worker thread, which the framework-free `dvt_shared` holds none of). NumPy only:
the backends come in through the engine a caller hands the batcher.
"""
