"""What every Tandem server and client shares: the server skeleton (lifecycle), TLS and tokens
(security, tokens), undecodable-message handling (decoding) and proto <-> request conversion (wire)."""
