"""The demo application that receives change sets (SPEC "Application delivery protocol")."""
