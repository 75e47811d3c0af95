"""Talk to a checkpoint live: a WebSocket server holding one StreamingSession per connection, and the static page
it serves (``tml/serve/web``). The wire protocol is described in ``tml.serve.server``; ``tml.tools.client`` streams
a file through it."""
