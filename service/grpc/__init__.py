"""The Open Inference Protocol over gRPC (KServe v2 / Triton's ``inference.GRPCInferenceService``).

Off unless ``BNFOLD_GRPC_PORT`` is set; then :class:`~service.grpc.server.GrpcServer` runs on the
HTTP server's event loop (``grpc.aio``) and serves the same repository, batchers, byte budget,
limits, API key and metrics. The messages and the servicer base class come from
``tritonclient.grpc`` (the ``grpc`` extra); the protocol's ``.proto`` is not copied here.
Modules: :mod:`~service.grpc.tensors` (messages <-> the codec), :mod:`~service.grpc.status`
(service errors -> gRPC status codes), :mod:`~service.grpc.servicer` (the RPCs),
:mod:`~service.grpc.server` (options and lifecycle).
"""
