"""A timer for services tested without one: takes offers and forgets and does nothing."""


class QuietTimer:
    async def offer(self, records):
        pass

    async def forget(self, task_ids):
        pass
