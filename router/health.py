"""grpc.health.v1 for the router: SERVING while at least one worker group is ready.

Load balancers and orchestrators route on this, so it follows worker readiness as it changes rather
than on a timer.
"""

from grpc_health.v1 import health, health_pb2

from nextserve.v1 import generation_pb2

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE_NAMES = ("", GENERATION_SERVICE)


def readiness_publisher(servicer: health.aio.HealthServicer):
    """A WorkerPool readiness listener that flips `servicer` for the whole server and for Generation."""

    async def publish(num_ready: int) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if num_ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_SERVICE_NAMES:
            await servicer.set(name, status)

    return publish
