"""tokenq producers: submit jobs and wait for their results.

from producers import Producer
producer = Producer(redis.asyncio.Redis.from_url(url, decode_responses=True))
job_id = await producer.submit("summarize", {"messages": [{"role": "user", "content": "Hi"}]})
result = await producer.result(job_id, timeout_s=30)
"""

from producers.client import NewJob, Producer

__all__ = ["NewJob", "Producer"]
