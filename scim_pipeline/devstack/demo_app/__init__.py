"""The demo application that receives change sets (docs/delivery-protocol.md)."""
